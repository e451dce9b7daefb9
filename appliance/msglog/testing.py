"""FileIO doubles for tests: a power cut (CrashIO) and a full or failing disk (FaultyIO).

CrashIO works on real files in a real directory, in the manner of SQLite's crash-test VFS (test6.c)
and LazyFS: every write, truncate and directory change goes to the real file system at once (so
readers see what a page cache would show them), and CrashIO remembers what has not been synced.
`crash()` then rolls the real files back to what a power cut could leave: unsynced writes dropped,
or a random part of them kept (in order, torn, zero-filled or scrambled, or an arbitrary subset),
and directory entries created, renamed or removed since their directory's last fsync undone.
`kill()` is a process death instead: open files are closed and nothing is lost.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from collections.abc import Callable
from functools import wraps
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from pathlib import Path

from .fileio import FileIO, OsIO

CRASH_MODES = ("drop", "prefix", "zero", "garbage", "subset")


@dataclass(eq=False)
class _Node:
    is_dir: bool = False
    durable: bytearray = field(default_factory=bytearray)  # the content as of the last sync
    ops: list[tuple[Any, ...]] = field(default_factory=list)  # unsynced: ("w", off, data) ("t", size) ("z", off, len)


def _apply(content: bytearray, op: tuple[Any, ...]) -> None:
    if op[0] == "w":
        _, offset, data = op
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset:offset + len(data)] = data
    elif op[0] == "t":
        size = op[1]
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))
    else:  # "z": fallocate, extends the size with zeros
        _, offset, length = op
        if offset + length > len(content):
            content.extend(bytes(offset + length - len(content)))


F = TypeVar("F", bound=Callable[..., Any])


def _op(fn: F) -> F:
    """One FileIO operation: atomic with respect to crash(), refused once the power is off, and
    counted so a test can cut the power at the n-th operation (`crash_at`)."""

    @wraps(fn)
    def op(self: CrashIO, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.frozen:
                raise OSError(errno.EIO, "power is off (CrashIO)")
            self.ops += 1
            if self.crash_at is not None and self.ops >= self.crash_at:
                self.crash_at = None
                self._crash(self.crash_mode)
                raise OSError(errno.EIO, "power cut (CrashIO)")
            return fn(self, *args, **kwargs)

    return cast(F, op)


class CrashIO(FileIO):
    """Set `crash_at` to cut the power when the op counter reaches it (that operation does not
    happen); or call crash() from any thread. After a cut every operation fails with EIO until
    revive(): the process that was running is dead, whatever its threads still try."""

    def __init__(self, root: Path, *, rng: random.Random | None = None, real_sync: bool = False):
        self._lock = threading.RLock()
        self.frozen = False
        self.ops = 0
        self.crash_at: int | None = None
        self.crash_mode: str | None = None
        self.root = Path(root).absolute()
        self.rng = rng or random.Random()
        self.real = OsIO()
        self.real_sync = real_sync  # also fdatasync the real file (slow; the model does not need it)
        self._entries: dict[Path, _Node] = {self.root: _Node(is_dir=True)}
        self._fds: dict[int, _Node] = {}
        self.crashes = 0
        self.root.mkdir(parents=True, exist_ok=True)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames:
                self._entries[Path(dirpath) / name] = _Node(is_dir=True)
            for name in filenames:
                path = Path(dirpath) / name
                self._entries[path] = _Node(durable=bytearray(path.read_bytes()))
        self._durable: dict[Path, _Node] = dict(self._entries)

    def _path(self, path: Path) -> Path:
        path = Path(path).absolute()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"CrashIO only models files under {self.root}, not {path}")
        return path

    # --- FileIO --------------------------------------------------------------------------------

    @_op
    def open(self, path: Path, *, create: bool = False) -> int:
        path = self._path(path)
        fd = self.real.open(path, create=create)
        node = self._entries.get(path)
        if node is None:
            node = self._entries[path] = _Node()
        self._fds[fd] = node
        return fd

    @_op
    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        n = self.real.pwrite(fd, data, offset)
        self._fds[fd].ops.append(("w", offset, bytes(memoryview(data)[:n])))
        return n

    @_op
    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return self.real.pread(fd, length, offset)

    @_op
    def size(self, fd: int) -> int:
        return self.real.size(fd)

    @_op
    def fdatasync(self, fd: int) -> None:
        node = self._fds[fd]
        if self.real_sync:
            self.real.fdatasync(fd)
        for op in node.ops:
            _apply(node.durable, op)
        node.ops.clear()

    @_op
    def truncate(self, fd: int, length: int) -> None:
        self.real.truncate(fd, length)
        self._fds[fd].ops.append(("t", length))

    @_op
    def fallocate(self, fd: int, offset: int, length: int) -> None:
        self.real.fallocate(fd, offset, length)
        self._fds[fd].ops.append(("z", offset, length))

    def close(self, fd: int) -> None:
        # Never fails: after a cut the descriptor is already gone, and closing it is harmless.
        with self._lock:
            if self._fds.pop(fd, None) is not None:
                self.real.close(fd)

    @_op
    def fsync_dir(self, path: Path) -> None:
        path = self._path(path)
        if self.real_sync:
            self.real.fsync_dir(path)
        for p in set(self._entries) | set(self._durable):
            if p.parent == path and p != path:
                node = self._entries.get(p)
                if node is None:
                    self._durable.pop(p, None)
                else:
                    self._durable[p] = node

    @_op
    def mkdir(self, path: Path) -> None:
        path = self._path(path)
        self.real.mkdir(path)
        self._entries[path] = _Node(is_dir=True)

    @_op
    def rename(self, src: Path, dst: Path) -> None:
        src, dst = self._path(src), self._path(dst)
        if self._entries[src].is_dir:
            raise NotImplementedError("CrashIO renames files only")
        self.real.rename(src, dst)
        self._entries[dst] = self._entries.pop(src)

    @_op
    def unlink(self, path: Path) -> None:
        path = self._path(path)
        self.real.unlink(path)
        del self._entries[path]

    @_op
    def listdir(self, path: Path) -> list[str]:
        return self.real.listdir(path)

    # --- faults --------------------------------------------------------------------------------

    def kill(self) -> None:
        """The process dies (kill -9): its files are closed, the OS keeps everything it was given
        (unsynced still: a later crash() can lose it). Operations fail until revive()."""
        with self._lock:
            self.frozen = True
            for fd in list(self._fds):
                self.close(fd)

    def revive(self) -> None:
        """Power (or a new process) is back: operations work again."""
        with self._lock:
            self.frozen = False

    def crash(self, mode: str | None = None) -> dict[str, str]:
        """A power cut: make the real files what the disk could hold now. `mode` picks what happens
        to each file's unsynced writes (random per file if None). Returns {path: mode} for files
        that had unsynced changes. Operations fail until revive()."""
        with self._lock:
            return self._crash(mode)

    def _crash(self, mode: str | None) -> dict[str, str]:
        self.kill()
        self.crashes += 1
        rng = self.rng
        alive = {p: n for p, n in self._durable.items() if self._reachable(p)}
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            for name in filenames:
                path = Path(dirpath) / name
                if path not in alive:
                    path.unlink()
            for name in dirnames:
                path = Path(dirpath) / name
                if path not in alive:
                    shutil.rmtree(path)
        what: dict[str, str] = {}
        for path in sorted(alive, key=lambda p: len(p.parts)):
            node = alive[path]
            if node.is_dir:
                path.mkdir(exist_ok=True)
                continue
            content = bytearray(node.durable)
            if node.ops:
                chosen = mode or rng.choice(CRASH_MODES)
                what[str(path)] = chosen
                self._keep_some(content, node.ops, chosen)
            node.durable = content
            node.ops = []
            path.write_bytes(bytes(content))
        # Nodes no longer reachable lose their unsynced state with them.
        self._entries = dict(alive)
        self._durable = dict(alive)
        return what

    def _reachable(self, path: Path) -> bool:
        for parent in path.parents:
            if parent == self.root:
                return True
            if parent not in self._durable:
                return False
        return path == self.root

    def _keep_some(self, content: bytearray, ops: list[tuple[Any, ...]], mode: str) -> None:
        rng = self.rng
        if mode == "drop":
            return
        if mode == "subset":
            for op in ops:
                if rng.random() < 0.5:
                    _apply(content, op)
            return
        keep = rng.randrange(len(ops) + 1)
        for op in ops[:keep]:
            _apply(content, op)
        if keep < len(ops) and ops[keep][0] == "w":
            _, offset, data = ops[keep]
            cut = rng.randrange(len(data) + 1)
            if mode == "prefix":
                torn = data[:cut]
            elif mode == "zero":
                torn = bytes(cut)
            else:
                torn = rng.randbytes(cut)
            _apply(content, ("w", offset, torn))


class FaultyIO(FileIO):
    """Another FileIO with a disk that can fill up or fail.

    space: bytes that writes and preallocation may still add (None: unlimited); a write that does
        not fit writes what fits (a short write), and the next one fails with ENOSPC.
    sync_error / write_error / create_error / rename_error: an errno to fail every fdatasync / pwrite
        / open(create) / rename with, until set back to None.
    """

    def __init__(self, inner: FileIO | None = None):
        self.inner = inner or OsIO()
        self.space: int | None = None
        self.sync_error: int | None = None
        self.write_error: int | None = None
        self.create_error: int | None = None
        self.rename_error: int | None = None
        self.failures = 0

    def _raise(self, code: int) -> None:
        self.failures += 1
        raise OSError(code, os.strerror(code))

    def open(self, path: Path, *, create: bool = False) -> int:
        if create and self.create_error is not None and not Path(path).exists():
            self._raise(self.create_error)
        return self.inner.open(path, create=create)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        if self.write_error is not None:
            self._raise(self.write_error)
        if self.space is not None:
            if self.space <= 0:
                self._raise(errno.ENOSPC)
            if len(data) > self.space:
                data = memoryview(data)[:self.space]
        n = self.inner.pwrite(fd, data, offset)
        if self.space is not None:
            self.space -= n
        return n

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return self.inner.pread(fd, length, offset)

    def size(self, fd: int) -> int:
        return self.inner.size(fd)

    def fdatasync(self, fd: int) -> None:
        if self.sync_error is not None:
            self._raise(self.sync_error)
        self.inner.fdatasync(fd)

    def truncate(self, fd: int, length: int) -> None:
        self.inner.truncate(fd, length)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        if self.space is not None:
            if length > self.space:
                self._raise(errno.ENOSPC)
            self.space -= length
        self.inner.fallocate(fd, offset, length)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def drop_cache(self, fd: int, offset: int, length: int) -> None:
        self.inner.drop_cache(fd, offset, length)

    def fsync_dir(self, path: Path) -> None:
        self.inner.fsync_dir(path)

    def mkdir(self, path: Path) -> None:
        self.inner.mkdir(path)

    def rename(self, src: Path, dst: Path) -> None:
        if self.rename_error is not None:
            self._raise(self.rename_error)
        self.inner.rename(src, dst)

    def unlink(self, path: Path) -> None:
        self.inner.unlink(path)

    def listdir(self, path: Path) -> list[str]:
        return self.inner.listdir(path)
