"""Schema trials: the schema set in force, and candidate sets judged against the recorded traffic by
the `replay` command itself (a child process: `replay --against DIR --format json`), or compared
statically (`replay diff`). A candidate directory must lie under an allowed root (console.trial_roots
and the directory holding the set in force), after symlinks are resolved.

The set in force is also what the message view decodes Protobuf and Avro payloads with.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Config

log = logging.getLogger(__name__)

MAX_RUNS = 10
REPLAY = [sys.executable, "-c", "from replay.cli import main; main()"]
_PROGRESS = re.compile(r"(\d[\d,]*)/(\d[\d,]*)")


class TrialError(Exception):
    """The trial cannot run as asked; the message is for the user."""


@dataclass
class TrialRun:
    id: str
    directory: Path
    user: str
    started: float
    process: subprocess.Popen[bytes]
    output: Path
    errors: Path
    finished: float | None = None
    returncode: int | None = None
    report: dict[str, Any] | None = None
    problem: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self) -> None:
        with self.lock:
            if self.finished is not None:
                return
            code = self.process.poll()
            if code is None:
                return
            self.finished, self.returncode = time.time(), code
            try:
                self.report = json.loads(self.output.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                lines = [line for line in re.split(r"[\r\n]+", _tail(self.errors))
                         if line.strip() and not line.startswith("replaying")]
                self.problem = "\n".join(lines[-5:]) or f"replay exited with {code} and wrote no report"

    @property
    def running(self) -> bool:
        self.poll()
        return self.finished is None

    def progress(self) -> tuple[int, int] | None:
        """(done, total) from the replay's progress bar, when it has drawn one."""
        found = _PROGRESS.findall(_tail(self.errors, 4096))
        if not found:
            return None
        done, total = found[-1]
        return int(done.replace(",", "")), int(total.replace(",", ""))

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started


def _tail(path: Path, size: int = 2000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).strip()


class Trials:
    def __init__(self, config: Config):
        self._config = config
        self._runs: dict[str, TrialRun] = {}
        self._scratch = Path(tempfile.mkdtemp(prefix="console-trials-"))
        self._active: Any = None
        self._active_key: tuple[float, ...] | None = None
        self._lock = threading.Lock()
        self._diffing = threading.Lock()

    # -- the set in force ---------------------------------------------------------------------------

    def _signature(self, directory: Path) -> tuple[float, ...]:
        stamps = []
        for root, _dirs, files in os.walk(directory):
            for name in files:
                try:
                    stamps.append(os.stat(os.path.join(root, name)).st_mtime)
                except OSError:
                    continue
        return (len(stamps), max(stamps, default=0.0))

    def schema_set(self) -> Any:
        """The set in force (loaded again when its files change), or None."""
        directory = self._config.schemas
        if directory is None:
            return None
        from appliance.governance import SchemaSetError, load_schema_set

        key = self._signature(directory)
        with self._lock:
            if key != self._active_key:
                try:
                    self._active = load_schema_set(directory)
                except SchemaSetError as exc:
                    log.warning("the console cannot load the schema set %s: %s", directory, exc)
                    self._active = None
                self._active_key = key
            return self._active

    def schema_for(self, topic: str) -> Any:
        schema_set = self.schema_set()
        if schema_set is None:
            return None
        _allowed, mapping = schema_set.route(topic)
        return mapping.schema if mapping is not None else None

    def active(self) -> dict[str, Any] | None:
        schema_set = self.schema_set()
        directory = self._config.schemas
        if schema_set is None or directory is None:
            return None
        manifest = directory / "manifest.yaml"
        try:
            manifest_text = manifest.read_text(encoding="utf-8")
        except OSError:
            manifest_text = ""
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
        return {"directory": str(directory), "version": schema_set.version, "revision": schema_set.revision,
                "mappings": [(f, m.schema_name) for f, m in schema_set.mappings], "schemas": sorted(schema_set.schemas),
                "manifest": manifest_text, "files": files[:200]}

    # -- candidates ----------------------------------------------------------------------------------

    def roots(self) -> list[Path]:
        roots = [Path(r) for r in self._config.console.trial_roots]
        if self._config.schemas is not None:
            roots.append(self._config.schemas.parent)
        return list(dict.fromkeys(Path(os.path.realpath(r)) for r in roots))

    def candidate(self, text: str) -> Path:
        """The directory `text` names, when it lies under an allowed root and holds a manifest."""
        text = text.strip()
        if not text or "\x00" in text:
            raise TrialError("name a schema set directory")
        roots = self.roots()
        if not roots:
            raise TrialError("no directory is allowed for trials: set console.trial_roots")
        path = Path(text)
        if not path.is_absolute():
            path = roots[0] / path
        real = Path(os.path.realpath(path))  # symlinks and .. resolved before the check
        if not any(real == root or real.is_relative_to(root) for root in roots):
            raise TrialError(f"{text} is outside the directories allowed for trials ({', '.join(map(str, roots))})")
        if not (real / "manifest.yaml").is_file():
            raise TrialError(f"{text} is not a schema set directory (no manifest.yaml)")
        return real

    def start(self, text: str, *, user: str) -> TrialRun:
        directory = self.candidate(text)
        if any(run.running for run in list(self._runs.values())):  # runs() may poll in a worker thread
            raise TrialError("a trial is running already: wait for it to finish")
        run_id = secrets.token_hex(6)
        output, errors = self._scratch / f"{run_id}.json", self._scratch / f"{run_id}.err"
        command = [*REPLAY, "--against", str(directory), "--state-dir", str(self._config.state_dir),
                   "--format", "json", "--output", str(output), "--fail-on", "never", "--jobs", "1", "--progress"]
        if self._config.schemas is not None:
            command += ["--baseline", str(self._config.schemas)]
        # rich draws its progress bar only for a terminal: tell it stderr is one (no colours), and
        # read "done/total" back from the file (progress()).
        env = {**os.environ, "TERM": "xterm", "COLUMNS": "100", "NO_COLOR": "1", "TTY_COMPATIBLE": "1",
               "TTY_INTERACTIVE": "1"}
        with errors.open("wb") as err:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                       env=env, start_new_session=True)
        run = TrialRun(run_id, directory, user, time.time(), process, output, errors)
        self._runs[run_id] = run
        log.info("console: %s started a schema trial of %s (%s)", user, directory, run_id)
        for old in sorted(self._runs.values(), key=lambda r: r.started)[:-MAX_RUNS]:
            if not old.running:
                del self._runs[old.id]
        return run

    def get(self, run_id: str) -> TrialRun | None:
        run = self._runs.get(run_id)
        if run is not None:
            run.poll()
        return run

    def runs(self) -> list[TrialRun]:
        runs = list(self._runs.values())  # a copy: start() may add one on the event loop meanwhile
        for run in runs:
            run.poll()
        return sorted(runs, key=lambda r: -r.started)

    def diff(self, text: str) -> dict[str, Any]:
        """`replay diff` of the set in force and the candidate, as JSON (exit 1 means breaking)."""
        if self._config.schemas is None:
            raise TrialError("no schema set is in force to compare with")
        directory = self.candidate(text)
        if not self._diffing.acquire(blocking=False):
            raise TrialError("a diff is running already: try again when it has finished")
        try:
            done = subprocess.run([*REPLAY, "diff", str(self._config.schemas), str(directory), "--format", "json"],
                                  capture_output=True, timeout=300, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TrialError("replay diff took longer than 5 minutes and was stopped") from exc
        finally:
            self._diffing.release()
        if done.returncode not in (0, 1):
            raise TrialError(done.stderr.decode("utf-8", "replace").strip() or f"replay diff exited with {done.returncode}")
        report: dict[str, Any] = json.loads(done.stdout)
        report["_directory"] = str(directory)
        return report

    def stop(self) -> None:
        for run in self._runs.values():
            if run.process.poll() is None:
                run.process.terminate()
                try:
                    run.process.wait(5)
                except subprocess.TimeoutExpired:
                    run.process.kill()
                    run.process.wait()
        shutil.rmtree(self._scratch, ignore_errors=True)
