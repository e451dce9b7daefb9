"""Release and purge failing part-way: what was done is still recorded as an audit event, and the
asker is told what failed. Faults at real boundaries: a real mosquitto stopped between two
releases, a file that cannot be replaced (a directory squatting on its temp name)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance import admin
from appliance.audit.errors import OperationRefused
from appliance.audit.layout import temp_name
from appliance.audit.operations import AuditOperations
from appliance.audit.purge import PurgeIncomplete, purge_quarantine
from appliance.audit.query import AuditQuery
from appliance.broker import BrokerEndpoint, EmbeddedBroker, render_mosquitto_conf
from appliance.msglog.reader import list_segments
from tests.audit.factory import TOPIC_REASON, decision, epoch
from tests.conftest import make_config
from tests.e2e.test_audit import a_quarantined_reading
from tests.helpers import Client, RunningAppliance
from tests.processes import free_port, mosquitto_process

T0 = epoch("2026-11-27T10:00:00")
P1, P3, P4 = b"secret-one", b"secret-three-payload", b"secret-four-payload-is-thirty!"


def on_disk(state: Path, needle: bytes) -> list[Path]:
    return [p for p in state.rglob("*") if p.is_file() and needle in p.read_bytes()]


def events(state: Path, kind: str) -> list[dict[str, Any]]:
    with AuditQuery(state) as query:
        rows = query.query(f"SELECT detail FROM events WHERE kind = '{kind}' ORDER BY id").rows
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120)


def row(decision_id: int, topic: str, payload: bytes) -> dict[str, Any]:
    """A quarantined message as the CLI and the console send it to `quarantine_release`."""
    return {"id": str(decision_id), "client_id": "sensor-1", "username": None, "peer": "127.0.0.1:1234",
            "mqtt_version": 4, "topic": topic, "qos": 1, "retain": False, "payload": payload.hex()}


def test_a_broker_stopped_mid_release_leaves_an_event_of_what_was_released(tmp_path: Path) -> None:
    """Three messages to release; the broker is stopped after the first was published: the first
    reaches a subscriber, the second fails, the third is not tried, and the appliance records all
    of it in one quarantine_released event (with the asker's detail) and answers with the error."""
    port = free_port()
    conf = render_mosquitto_conf(port=port, data_dir=tmp_path / "broker", extra=[])
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        with mosquitto_process(conf, tmp_path / "broker", port) as broker:
            subscriber = Client(port, client_id="release-watcher").connect()
            subscriber.subscribe("release/#", qos=1)
            asked = 0

            def endpoint() -> BrokerEndpoint:
                nonlocal asked
                asked += 1
                if asked == 2:  # the first message is out: stop the broker before the second
                    subscriber.expect(1)  # (blocks the loop briefly: nothing else runs in this test)
                    broker.terminate()
                    broker.wait(10)
                return BrokerEndpoint("127.0.0.1", port)

            assert running.app.audit is not None
            operations = AuditOperations(running.app.audit, running.app.pipeline, endpoint)
            messages = [row(101, "release/a", b"first"), row(102, "release/b", b"second"),
                        row(103, "release/c", b"third")]
            answer = running.call(operations.quarantine_release(
                {"messages": messages, "detail": {"console_user": "olga", "via": "console", "ids": ["spoofed"]},
                 "_peer": {"user": "tester", "uid": 0, "pid": 1}}))
            assert asked == 2
        subscriber.disconnect()
        results = answer["results"]
        assert [r["id"] for r in results] == ["101", "102"]
        assert results[0]["released"] is True
        assert results[1]["released"] is False and "broker" in results[1]["error"]
        assert answer["not_attempted"] == ["103"]
        assert answer["error"].startswith("102: ")
        state = tmp_path / "state"
        recorded = events(state, "quarantine_released")
        assert len(recorded) == 1, recorded
        detail = recorded[0]
        assert detail["ids"] == ["101"] and detail["failed"] == ["102"] and detail["not_attempted"] == ["103"]
        assert detail["error"] == answer["error"]
        assert detail["console_user"] == "olga" and detail["by"]["user"] == "tester"
    finally:
        running.stop()


def test_a_release_that_fails_at_once_is_recorded_too(tmp_path: Path) -> None:
    """No broker at all (nothing listens on the port): nothing is released, and the event says
    that the release was tried, for which ids, and why it failed."""
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        assert running.app.audit is not None
        operations = AuditOperations(running.app.audit, running.app.pipeline,
                                     lambda: BrokerEndpoint("127.0.0.1", free_port()))
        answer = running.call(operations.quarantine_release({"messages": [row(7, "release/x", b"x"),
                                                                          row(8, "release/y", b"y")]}))
        assert answer["results"][0]["released"] is False and answer["not_attempted"] == ["8"]
        detail, = events(tmp_path / "state", "quarantine_released")
        assert detail["ids"] == [] and detail["failed"] == ["7"] and detail["not_attempted"] == ["8"]
        assert "could not" in detail["error"] or "failed" in detail["error"]
    finally:
        running.stop()


@pytest.fixture
def held(audit_state: Callable[..., Path]) -> Path:
    """Ids 1-2 in Parquet, 3 in a sealed segment not converted yet, 4 in the active segment."""
    return audit_state([
        decision(1, T0, device="a", verdict="reject", payload=P1),
        decision(2, T0 + 60, device="b", verdict="accept"),
        decision(3, T0 + 120, device="b", verdict="reject", payload=P3, reasons=[TOPIC_REASON]),
        decision(4, T0 + 180, device="c", verdict="reject", payload=P4, topic="sensor/c/humidity"),
    ], split=(0.5, 0.75))


def block_rewrite(state: Path, payload: bytes, suffix: str = ".seg") -> Path:
    """Make the file (`suffix`) holding `payload` impossible to replace: a directory where its
    rewrite's temp file must go (open() and DuckDB's COPY fail on it, as on a full disk)."""
    holders = [p for p in on_disk(state, payload) if p.suffix == suffix]
    assert len(holders) == 1, holders
    temp_name(holders[0]).mkdir()
    return holders[0]


def test_a_purge_that_cannot_rewrite_one_file_purges_the_others_and_names_what_is_left(held: Path) -> None:
    blocked = block_rewrite(held, P3)
    assert blocked in [info.path for info in list_segments(held / "log")]
    with pytest.raises(PurgeIncomplete) as raised:
        purge_quarantine(held, [1, 3, 4], seal=None)
    assert raised.value.kept == {3} and raised.value.purged == {1, 4}
    assert [path for path, _ in raised.value.failures] == [blocked]
    assert str(raised.value).startswith("1 file(s) could not be rewritten (") and "1 payload(s) are still on disk" in str(raised.value)
    assert on_disk(held, P1) == [] and on_disk(held, P4) == []  # the other files were rewritten
    assert on_disk(held, P3) == [blocked]
    temp_name(blocked).rmdir()
    assert purge_quarantine(held, [3], seal=None) == 1  # the fault gone, the rest follows
    assert on_disk(held, P3) == []


def test_a_parquet_file_that_cannot_be_rewritten_keeps_its_ids_out_of_the_purged(held: Path) -> None:
    """Id 1 is in a Parquet file and in its (converted, kept) segment: the segment is rewritten, the
    Parquet file is not, so 1 is not purged (its bytes are still on disk)."""
    blocked = block_rewrite(held, P1, ".parquet")
    with pytest.raises(PurgeIncomplete) as raised:
        purge_quarantine(held, None, seal=None)
    assert raised.value.kept == {1} and raised.value.purged == {3, 4}
    assert on_disk(held, P1) == [blocked]


def test_the_cli_purge_records_a_partial_purge_and_exits_1(held: Path) -> None:
    """With the appliance stopped: the CLI writes the event itself, with the failure."""
    block_rewrite(held, P3)
    done = subprocess.run([sys.executable, "-m", "appliance", "quarantine", "purge", "1", "3", "4",
                           "--state-dir", str(held)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not purged: 3" in done.stderr
    detail, = events(held, "quarantine_purged")
    assert detail["ids"] == ["1", "3", "4"] and detail["purged"] == 2 and detail["failed"] == ["3"]
    assert "could not be rewritten" in detail["error"] and detail["by"]["user"]


def test_the_cli_says_what_a_release_did_not_do_and_exits_1(tmp_path: Path) -> None:
    """`appliance quarantine release` while the appliance's own mosquitto is stopped (SIGSTOP: it
    takes connections in the kernel and answers nothing): the CLI names the message not released
    and why, exits 1, the message stays quarantined, and the appliance recorded the attempt."""
    with a_quarantined_reading(tmp_path) as (running, state, schemas, entry):
        path = schemas / "temperature.json"
        path.write_text(path.read_text().replace('"maximum": 125', '"maximum": 200'))
        assert admin.call(state, "reload", timeout=60)["reloaded"]  # the set in force now accepts it
        broker = running.app.broker
        assert isinstance(broker, EmbeddedBroker) and broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            released = cli("quarantine", "release", str(entry["id"]), "--state-dir", str(state))
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        assert released.returncode == 1, released.stdout + released.stderr
        assert f"{entry['id']}: not released: " in released.stderr and "did not answer in time" in released.stderr
        assert "released (new verdict" not in released.stdout
        detail, = events(state, "quarantine_released")
        assert detail["ids"] == [] and detail["failed"] == [str(entry["id"])] and detail["not_attempted"] == []
        rows = json.loads(cli("quarantine", "list", "--state-dir", str(state), "--format", "json").stdout)["rows"]
        assert [row["id"] for row in rows] == [entry["id"]]


def test_a_release_event_cannot_be_recorded_through_the_admin_socket(tmp_path: Path) -> None:
    """Only the process that published records a `quarantine_released` event: anything reaching the
    admin socket asking `audit_event` for one is refused, and nothing is written."""
    state = tmp_path / "state"
    running = RunningAppliance(make_config(state)).start()
    try:
        with pytest.raises(admin.AdminError, match="cannot be recorded from outside"):
            admin.call(state, "audit_event", kind="quarantine_released", detail={"ids": ["1"]})
        admin.call(state, "audit_event", kind="quarantine_purged", detail={"ids": ["1"], "purged": 0})
        assert events(state, "quarantine_released") == []
        assert events(state, "quarantine_purged")[0]["ids"] == ["1"]
    finally:
        running.stop()


@pytest.fixture
def three_days(audit_state: Callable[..., Path]) -> Path:
    """Ids 1-4 held, in three Parquet files (a day each) and in the converted segment beside them."""
    return audit_state([
        decision(1, T0, device="a", verdict="reject", payload=P1),
        decision(2, T0 + 86_400, device="b", verdict="reject", payload=b"secret-two-on-day-two"),
        decision(3, T0 + 2 * 86_400, device="b", verdict="reject", payload=P3),
        decision(4, T0 + 2 * 86_400 + 60, device="c", verdict="reject", payload=P4),
    ], split=(1.0, 1.0))


def truncate_day(state: Path, day: str) -> Path:
    """Cut a decisions file in half (its footer gone): DuckDB cannot read it at all."""
    [path] = (state / "audit" / "parquet" / "decisions" / f"day={day}").glob("*.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_parquet_file_fails_alone_and_the_others_are_purged(three_days: Path) -> None:
    broken = truncate_day(three_days, "2026-11-28")
    with pytest.raises(PurgeIncomplete) as raised:
        purge_quarantine(three_days, None, seal=None)
    assert [path for path, _ in raised.value.failures] == [broken]
    assert raised.value.failures[0][1].startswith("could not be read: ")
    assert raised.value.unreadable == 1 and "unknown ids in 1 file(s)" in raised.value.not_purged()
    assert on_disk(three_days, P1) == [] and on_disk(three_days, P3) == [] and on_disk(three_days, P4) == []


def test_the_cli_records_a_purge_that_met_a_truncated_parquet_file(three_days: Path) -> None:
    truncate_day(three_days, "2026-11-28")
    done = cli("quarantine", "purge", "--all", "--yes", "--state-dir", str(three_days))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "could not be read" in done.stderr
    detail, = events(three_days, "quarantine_purged")
    assert detail["ids"] == "all" and "could not be read" in detail["error"]
    assert on_disk(three_days, P1) == [] and on_disk(three_days, P4) == []


def test_a_malformed_request_is_refused_before_anything_is_published(tmp_path: Path) -> None:
    """A later row that cannot be a message (bad hex, a missing field, an unknown protocol level)
    or a `detail` that is not an object: refused whole, the broker never asked, nothing recorded."""
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        assert running.app.audit is not None
        asked: list[int] = []
        operations = AuditOperations(running.app.audit, running.app.pipeline,
                                     lambda: asked.append(1) or BrokerEndpoint("127.0.0.1", free_port()))
        good = row(21, "release/a", b"a")
        bad_rows = [{**row(22, "release/b", b"b"), "payload": "zz"}, {k: v for k, v in good.items() if k != "topic"},
                    {**row(23, "release/c", b"c"), "mqtt_version": 9}, "not a row"]
        for bad in bad_rows:
            with pytest.raises(OperationRefused, match="message 2 of the request is malformed"):
                running.call(operations.quarantine_release({"messages": [good, bad]}))
        with pytest.raises(OperationRefused, match="detail must be an object"):
            running.call(operations.quarantine_release({"messages": [good], "detail": ["olga"]}))
        assert asked == []
        assert events(tmp_path / "state", "quarantine_released") == []
    finally:
        running.stop()


def test_an_id_given_twice_is_released_once_and_one_being_released_is_refused(tmp_path: Path) -> None:
    port = free_port()
    conf = render_mosquitto_conf(port=port, data_dir=tmp_path / "broker", extra=[])
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        with mosquitto_process(conf, tmp_path / "broker", port):
            subscriber = Client(port, client_id="release-watcher").connect()
            subscriber.subscribe("release/#", qos=1)
            assert running.app.audit is not None
            operations = AuditOperations(running.app.audit, running.app.pipeline,
                                         lambda: BrokerEndpoint("127.0.0.1", port))
            answer = running.call(operations.quarantine_release(
                {"messages": [row(5, "release/a", b"five"), row(5, "release/a", b"five"), row(6, "release/b", b"six")]}))
            assert [(r["id"], r["released"]) for r in answer["results"]] == [("5", True), ("6", True)]
            publisher = Client(port, client_id="sentinel").connect()
            publisher.publish("release/sentinel", b"end", qos=1)  # after both releases were acknowledged
            got = [m.payload for m in subscriber.expect(3)]
            assert got == [b"five", b"six", b"end"]

            async def both() -> list[Any]:
                # The first request holds id 7 from its start (before its first wait) until its end.
                return await asyncio.gather(
                    operations.quarantine_release({"messages": [row(7, "release/c", b"seven")]}),
                    operations.quarantine_release({"messages": [row(8, "release/d", b"eight"),
                                                                row(7, "release/c", b"seven")]}),
                    return_exceptions=True)

            first, second = running.call(both())
            assert first["results"][0]["released"] is True
            assert isinstance(second, OperationRefused) and "already being released" in str(second) and "7" in str(second)
            publisher.publish("release/sentinel", b"end", qos=1)
            assert [m.payload for m in subscriber.expect(2)] == [b"seven", b"end"]
            publisher.disconnect()
            subscriber.disconnect()
        assert [d["ids"] for d in events(tmp_path / "state", "quarantine_released")] == [["5", "6"], ["7"]]
    finally:
        running.stop()


def test_a_release_cut_short_by_a_stop_is_recorded(tmp_path: Path) -> None:
    """The handler is cancelled (as the appliance's graceful stop does) while a publish waits for a
    broker that takes the connection and never answers: the batch's event is still written, the
    message being published named as failed (it may or may not have arrived), the rest untried."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel; nothing ever answers
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        assert running.app.audit is not None
        asking = asyncio.Event()

        def endpoint() -> BrokerEndpoint:
            asking.set()
            return BrokerEndpoint("127.0.0.1", silent.getsockname()[1])

        operations = AuditOperations(running.app.audit, running.app.pipeline, endpoint)

        async def cancelled() -> bool:
            task = asyncio.create_task(operations.quarantine_release(
                {"messages": [row(31, "release/a", b"a"), row(32, "release/b", b"b")], "detail": {"via": "test"}}))
            await asking.wait()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        assert running.call(cancelled())
        running.call(running.app.audit.sync())  # (a graceful stop writes it as the service stops)
        detail, = events(tmp_path / "state", "quarantine_released")
        assert detail["ids"] == [] and detail["failed"] == ["31"] and detail["not_attempted"] == ["32"]
        assert "cut short (CancelledError)" in detail["error"] and detail["via"] == "test"
    finally:
        running.stop()
        silent.close()


class StalledLog:
    """The appliance's audit service, but its message log does not write in time (sync times out):
    a fault at the log's boundary; everything else is the real service."""

    def __init__(self, service: Any):
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    async def sync(self, timeout: float = 30.0) -> None:
        raise TimeoutError


def test_a_log_that_does_not_write_is_a_warning_even_when_all_were_released(tmp_path: Path) -> None:
    port = free_port()
    conf = render_mosquitto_conf(port=port, data_dir=tmp_path / "broker", extra=[])
    running = RunningAppliance(make_config(tmp_path / "state")).start()
    try:
        with mosquitto_process(conf, tmp_path / "broker", port):
            assert running.app.audit is not None
            operations = AuditOperations(StalledLog(running.app.audit), running.app.pipeline,  # type: ignore[arg-type]
                                         lambda: BrokerEndpoint("127.0.0.1", port))
            answer = running.call(operations.quarantine_release({"messages": [row(41, "release/a", b"a")]}))
        assert answer["results"][0]["released"] is True and answer["error"] is None
        assert "has not written for 30 s" in answer["warning"] and "may not be on disk yet" in answer["warning"]
    finally:
        running.stop()
