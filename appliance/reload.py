"""Hot reload: the config file and the schema set are watched (watchdog), SIGHUP also reloads.

A reload builds and checks the whole new config and schema set first (off the event loop), then
swaps them in on the event loop between two messages: a message is judged entirely by the old set
or entirely by the new one. If anything is wrong, the old ones stay; the error (with file and line)
is logged, counted and recorded as a `config_reload` event. Settings that cannot change while
running are reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from appliance.config import Config

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.5
# Settings that take effect only at start: sockets, directories, the broker and its credentials.
RESTART_KEYS = ("listen", "listeners", "state_dir", "broker", "metrics", "limits", "use_uvloop", "audit", "upstream")


def needs_restart(old: Config, new: Config) -> list[str]:
    old_values, new_values = old.model_dump(), new.model_dump()
    return [key for key in RESTART_KEYS if key in old_values and old_values[key] != new_values.get(key)]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


class _Handler(FileSystemEventHandler):
    def __init__(self, wanted: Callable[[str], bool], notify: Callable[[], None]):
        self._wanted = wanted
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if any(path and self._wanted(path) for path in paths):
            self._notify()


class ReloadWatcher:
    """Calls `reload(reason)` on the event loop after files settle (debounced) or on SIGHUP."""

    def __init__(self, reload: Callable[[str], Awaitable[Any]]):
        self._reload = reload
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[Any] | None = None
        self._again = False
        self._schema_watch: Any = None  # the observer's watch of the schema dir in force
        self.schema_dir: Path | None = None

    def start(self, loop: asyncio.AbstractEventLoop, *, config_file: Path | None, schema_dir: Path | None, watch: bool) -> None:
        self._loop = loop
        try:
            loop.add_signal_handler(signal.SIGHUP, self.trigger, "SIGHUP")
        except (RuntimeError, ValueError):  # not the main thread (tests run the loop elsewhere)
            log.debug("SIGHUP reload unavailable outside the main thread")
        if not watch:
            return
        observer = Observer()
        if config_file is not None:
            config_file = config_file.resolve()
            observer.schedule(_Handler(lambda p: Path(p).resolve() == config_file, self._from_thread),
                              str(config_file.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.watch_schemas(schema_dir)

    def watch_schemas(self, schema_dir: Path | None) -> None:
        """Watch `schema_dir` instead of the schema dir watched so far (a reload may name another)."""
        if self._observer is None:
            return
        new = schema_dir.resolve() if schema_dir is not None and schema_dir.is_dir() else None
        if new == self.schema_dir:
            return
        if self._schema_watch is not None:
            self._observer.unschedule(self._schema_watch)
            self._schema_watch = None
        self.schema_dir = new
        if new is not None:
            root = new.as_posix()
            self._schema_watch = self._observer.schedule(
                _Handler(lambda p: _inside(Path(p).resolve().as_posix(), root), self._from_thread),
                root, recursive=True)

    def _from_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.trigger, "file change")

    def trigger(self, reason: str) -> None:
        """Reload DEBOUNCE_S after the last trigger; a trigger during a reload queues one more."""
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        delay = 0.0 if reason == "SIGHUP" else DEBOUNCE_S
        self._timer = self._loop.call_later(delay, self._fire, reason)

    def _fire(self, reason: str) -> None:
        self._timer = None
        if self._running is not None and not self._running.done():
            self._again = True
            return
        self._running = asyncio.ensure_future(self._run(reason))

    async def _run(self, reason: str) -> None:
        await self._reload(reason)
        if self._again:
            self._again = False
            self.trigger("file change")

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            try:
                self._loop.remove_signal_handler(signal.SIGHUP)
            except (RuntimeError, ValueError):
                pass
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
