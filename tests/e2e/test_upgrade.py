"""First start of this version on a state dir the previous version (SQLite journal + DuckDB file +
outbox rows) wrote: the real appliance imports it, loses nothing, and forwards the old outbox."""

from __future__ import annotations

from pathlib import Path

from appliance.audit.query import AuditQuery
from tests.audit.test_upgrade import build_old_state
from tests.conftest import make_config
from tests.forward.harness import CloudBroker, Subscriber
from tests.helpers import Client, RunningAppliance, wait_until


def test_the_appliance_imports_an_old_state_dir_and_forwards_its_outbox(tmp_path: Path):
    state = tmp_path / "state"
    old = build_old_state(state, hot_wal=True)
    cloud = CloudBroker(tmp_path / "cloud").start()
    subscriber = Subscriber(cloud.port, "#").start()
    # The test data is weeks old: no outbox age limit, or the old messages would expire (correctly).
    config = make_config(state, **{"upstream.url": cloud.url, "upstream.topic_template": "{topic}",
                                   "upstream.outbox.max_age": None})
    running = RunningAppliance(config).start()
    try:
        old_payloads = {row[4] for row in old["outbox"]}
        wait_until(lambda: old_payloads <= set(subscriber.payloads()), timeout=60, message="the old outbox forwarded")
        pub = Client(running.port, version=5).connect()
        pub.publish("plant/new", b"after the upgrade", qos=1)
        pub.disconnect()
        wait_until(lambda: b"after the upgrade" in subscriber.payloads(), message="a new message forwarded")
        assert (state / "audit" / "journal.sqlite3.migrated").exists() and not (state / "audit" / "journal.sqlite3").exists()
    finally:
        running.stop()
        subscriber.stop()
        cloud.stop()
    with AuditQuery(state) as query:
        cursor = query.cursor()
        ids = {r[0] for r in cursor.execute("SELECT id FROM decisions").fetchall()}
        assert {r[0] for r in old["decisions"]} <= ids  # every old verdict, once
        assert len(ids) == len(old["decisions"]) + 1  # and the new one
        assert cursor.execute("SELECT count(*) FROM decisions").fetchone()[0] == len(ids)  # no duplicates
        assert {r[0] for r in old["events"]} <= {r[0] for r in cursor.execute("SELECT id FROM events").fetchall()}
