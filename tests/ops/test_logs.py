"""Log formats: text for people, JSON lines for shippers, priorities for journald."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.logs import setup_logging, writes_to_journal


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_text_is_the_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("appliance.proxy").info("client %s connected", "t1")
    logging.getLogger("appliance.proxy").debug("not shown at info")
    line = out.getvalue()
    assert line.count("\n") == 1
    assert line.rstrip().endswith("INFO    appliance.proxy: client t1 connected")
    assert line[:4].isdigit()  # starts with the time


def test_json_lines_carry_extra_fields():
    out = io.StringIO()
    setup_logging("debug", "json", stream=out)
    logging.getLogger("appliance.governance").warning("rejected %s", "sensor/t1/temperature",
                                                      extra={"client_id": "t1", "reason_code": 0x99})
    entry = json.loads(out.getvalue())
    assert entry.pop("ts").endswith("Z")
    assert entry == {"level": "warning", "logger": "appliance.governance", "message": "rejected sensor/t1/temperature",
                     "client_id": "t1", "reason_code": 153}


def test_json_exceptions_stay_on_one_line():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "failed" and "RuntimeError: boom" in entry["exc"]


def test_json_values_that_are_not_json_become_strings():
    out = io.StringIO()
    setup_logging("info", "json", stream=out)
    logging.getLogger("x").info("path", extra={"path": Path("/var/lib/mqtt-appliance")})
    assert json.loads(out.getvalue())["path"] == "/var/lib/mqtt-appliance"


def test_setting_up_again_replaces_the_handler():
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", stream=first)
    setup_logging("warning", "json", stream=second)
    logging.getLogger("x").warning("once")
    logging.getLogger("x").info("filtered")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        setup_logging("info", "xml")  # type: ignore[arg-type]


def test_journal_gets_priorities_instead_of_timestamps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with (tmp_path / "journal").open("w+") as stream:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert writes_to_journal(stream)
        setup_logging("debug", stream=stream)
        log = logging.getLogger("appliance.app")
        log.error("cannot listen")
        log.info("ready")
        try:
            raise ValueError("bad")
        except ValueError:
            log.warning("reload failed", exc_info=True)
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<3>ERROR   appliance.app: cannot listen"
    assert lines[1] == "<6>INFO    appliance.app: ready"
    assert lines[2] == "<4>WARNING appliance.app: reload failed"
    assert all(line.startswith("<4>") for line in lines[3:]) and lines[-1] == "<4>ValueError: bad"


def test_another_stream_is_not_the_journal(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not writes_to_journal(io.StringIO())
