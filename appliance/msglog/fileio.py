"""The message log's I/O boundary: every file and directory operation of the log and the cursor goes
through a FileIO, so tests can swap in one that models a power cut or a full disk
(appliance/msglog/testing.py). `OsIO` is the real one: thin wrappers over os.*, nothing cached."""

from __future__ import annotations

import os
from pathlib import Path


class FileIO:
    """The operations the log needs. Paths are absolute or relative to the working directory; fds are
    real OS file descriptors (readers open files themselves, read-only)."""

    def open(self, path: Path, *, create: bool = False) -> int:
        """Open for reading and writing (creating the file if asked); the caller fsyncs the directory."""
        raise NotImplementedError

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        raise NotImplementedError

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        raise NotImplementedError

    def size(self, fd: int) -> int:
        raise NotImplementedError

    def fdatasync(self, fd: int) -> None:
        raise NotImplementedError

    def truncate(self, fd: int, length: int) -> None:
        raise NotImplementedError

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        raise NotImplementedError

    def close(self, fd: int) -> None:
        raise NotImplementedError

    def drop_cache(self, fd: int, offset: int, length: int) -> None:
        """Advise the kernel to drop cached pages of a range (no effect on contents)."""

    def fsync_dir(self, path: Path) -> None:
        raise NotImplementedError

    def mkdir(self, path: Path) -> None:
        """Create one directory (the caller fsyncs its parent); FileExistsError if it exists."""
        raise NotImplementedError

    def rename(self, src: Path, dst: Path) -> None:
        raise NotImplementedError

    def unlink(self, path: Path) -> None:
        raise NotImplementedError

    def listdir(self, path: Path) -> list[str]:
        raise NotImplementedError

    # Built from the primitives above, so every FileIO gets them right the same way.

    def makedirs(self, path: Path, *, within: Path | None = None) -> None:
        """Create `path` and any missing parents, and make every one durable: each directory from
        `within` (exclusive: a directory known to be durable, such as the state dir) down to `path`
        is fsync'd into its parent, whether this call created it or found it (a process killed
        between its mkdir and that fsync left it there, not durable), and `path` itself is fsync'd,
        so a power cut right after cannot take the directory or its entries away again. Without
        `within` (or with one `path` is not under), that is `path` and the missing ones above it."""
        path = Path(path).absolute()
        top = path.parent
        if within is not None and (Path(within).absolute() == path or Path(within).absolute() in path.parents):
            top = Path(within).absolute()
        chain = []
        probe = path
        while probe != probe.parent and (not probe.exists() or top in probe.parents):
            chain.append(probe)
            probe = probe.parent
        for directory in reversed(chain):
            if not directory.exists():
                try:
                    self.mkdir(directory)
                except FileExistsError:
                    pass
            self.fsync_dir(directory.parent)
        self.fsync_dir(path)

    def write_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """pwrite until everything is written (a short write is retried; it is not an error by itself)."""
        view = memoryview(data)
        while view:
            n = self.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(f"pwrite wrote {n} bytes")
            view = view[n:]
            offset += n


class OsIO(FileIO):
    def open(self, path: Path, *, create: bool = False) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o640)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        os.posix_fallocate(fd, offset, length)

    def close(self, fd: int) -> None:
        os.close(fd)

    def drop_cache(self, fd: int, offset: int, length: int) -> None:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o750)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)


def no_readahead(fd: int) -> None:
    """Reading the active segment must not read ahead into its preallocated tail: readahead fills
    the page cache there with large folios, and each later append that dirties one is written (and
    counted in /proc/PID/io write_bytes) whole. Measured: a reader taking 64 KiB at the tail after
    every sync turned 3 KB appends into ~90 KB written per fdatasync; with POSIX_FADV_RANDOM on
    the reader's descriptor, 7 KB (the appended pages). docs/performance.md has the figures."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except (OSError, AttributeError):  # not on this platform or file system: only an optimisation
        pass
