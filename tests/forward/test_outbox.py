"""The outbox over a real MessageLog (writer thread, power-safe syncs) and a real Cursor file."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

from appliance.audit.records import COMPACT_DECISION
from appliance.forward import Outbox
from appliance.msglog import SegmentInfo, list_segments, read_segment
from appliance.msglog.cursor import Cursor
from appliance.msglog.format import RECORD_HEADER_SIZE, encode_file_header, encode_record
from appliance.msglog.log import MessageLog, SyncPolicy
from appliance.msglog.testing import CrashIO, FaultyIO
from tests.forward.harness import bounds, harness
from tests.helpers import wait_until


def test_next_batch_reads_in_log_order_and_acknowledge_updates_the_counters(tmp_path: Path):
    with harness(tmp_path) as h:
        msgs = [h.row(f"sensor-{i % 3}", i) for i in range(250)]
        noisy = []
        for i, msg in enumerate(msgs):  # rejected decisions and events in between are passed over
            noisy += [msg, h.rejected("x"), h.event()] if i % 7 == 0 else [msg]
        assert h.add(noisy) == 250
        outbox = h.make_outbox()
        depth = outbox.depth()
        assert depth.messages == 250
        assert depth.bytes == sum(m.size for m in msgs)
        assert depth.oldest_ts == msgs[0].ts

        first = outbox.next_batch(0, 100)
        assert [r.id for r in first] == [m.id for m in msgs[:100]]
        second = outbox.next_batch(first[-1].seq, 1000)
        assert [r.id for r in second] == [m.id for m in msgs[100:]]
        row = second[0]
        assert (row.payload, row.topic, row.schema, row.qos, row.retain) == (msgs[100].payload, msgs[100].topic, "reading:v1", None, False)
        assert row.size == msgs[100].size

        assert outbox.acknowledge([r.seq for r in first] + [10**12]) == 100  # an unknown seq is skipped
        assert outbox.acknowledge([first[0].seq]) == 0  # acknowledged already
        depth = outbox.depth()
        assert depth.messages == 150 and depth.bytes == sum(m.size for m in msgs[100:])
        assert depth.oldest_ts == msgs[100].ts
        assert outbox.cursor == second[0].seq - 1

        # Messages appended later are counted on the next look at the log; imported rows of an old
        # outbox (FORWARD_ONLY) are messages too.
        h.add([h.row("sensor-9", 0), h.imported("old", 0), h.row("no", 0, forward=False)])
        assert outbox.refresh().messages == 152
        assert [r.client_id for r in outbox.next_batch(second[-1].seq, 10)] == ["sensor-9", "old"]
        outbox.close()


def test_out_of_order_acknowledgements_move_the_cursor_to_the_highest_contiguous(tmp_path: Path):
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(10)])
        outbox = h.make_outbox()
        rows = outbox.next_batch(0, 10)
        start = outbox.cursor
        assert start == rows[0].seq - 1
        assert outbox.acknowledge([rows[i].seq for i in (1, 2, 5)]) == 3
        assert outbox.cursor == start and outbox.depth().messages == 7  # 0 is still out there
        assert [r.seq for r in outbox.next_batch(0, 10)] == [rows[i].seq for i in (0, 3, 4, 6, 7, 8, 9)]
        outbox.acknowledge([rows[0].seq])
        assert outbox.cursor == rows[2].seq
        outbox.acknowledge([rows[4].seq, rows[3].seq])
        assert outbox.cursor == rows[5].seq
        assert outbox.depth().oldest_ts == rows[6].ts
        outbox.close()


def test_only_records_the_log_made_durable_are_read(tmp_path: Path):
    """The publisher of a record above durable_seq has not been told it is stored: not forwarded yet."""
    with harness(tmp_path) as h:
        msgs = [h.row("s", i) for i in range(10)]
        h.add(msgs)
        seqs = [r.seq for r in h.make_outbox().next_batch(0, 10)]
        durable = [seqs[4]]
        outbox = Outbox(h.log_dir, bounds(), cursor=Cursor(tmp_path / "other.cursor"), durable_seq=lambda: durable[0])
        assert [r.seq for r in outbox.next_batch(0, 100)] == seqs[:5] and outbox.depth().messages == 5
        durable[0] = seqs[-1]
        assert [r.seq for r in outbox.next_batch(seqs[4], 100)] == seqs[5:]
        outbox.close()


def test_a_restart_resumes_from_the_saved_cursor(tmp_path: Path):
    with harness(tmp_path) as h:
        msgs = [h.row(f"s{i % 4}", i) for i in range(300)]
        h.add(msgs)
        outbox = h.make_outbox()
        rows = outbox.next_batch(0, 120)
        outbox.acknowledge(r.seq for r in rows)
        outbox.close()  # saves the cursor
        assert Cursor(h.cursor_path).load() == rows[-1].seq

        again = h.make_outbox()
        assert again.cursor == rows[-1].seq and again.needed_from() == rows[-1].seq + 1
        assert again.depth().messages == 180
        assert [r.id for r in again.next_batch(0, 1000)] == [m.id for m in msgs[120:]]
        again.close()


def test_cursor_saves_wait_for_the_interval_or_the_count(tmp_path: Path):
    """Each save is an fdatasync (SD wear): not one per acknowledgement. What was acknowledged after
    the last save is sent again after a crash: the restart sees the saved cursor."""
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(100)])
        outbox = h.make_outbox(save_interval=3600.0, save_every=50)
        rows = outbox.next_batch(0, 100)
        start = outbox.saved_cursor
        outbox.acknowledge(r.seq for r in rows[:49])
        assert outbox.saved_cursor == start and Cursor(h.cursor_path).load() == start
        assert outbox.needed_from() == start + 1  # the log must keep what a restart would read
        crashed = h.make_outbox()  # a restart now (the first one never saved): resends those 49
        assert crashed.depth().messages == 100
        outbox.acknowledge([rows[49].seq])  # the 50th: saved
        assert outbox.saved_cursor == rows[49].seq == Cursor(h.cursor_path).load()
        outbox.acknowledge([rows[50].seq])
        assert not outbox.checkpoint()  # not due
        assert outbox.checkpoint(force=True) and Cursor(h.cursor_path).load() == rows[50].seq
        outbox.close()
        crashed.close()


def test_the_log_keeps_the_segments_the_outbox_still_needs(tmp_path: Path):
    with harness(tmp_path) as h:
        msgs = [h.row("s", i, payload=b"p" * 2000) for i in range(600)]  # ~1.2 MB: several 256 KiB segments
        for start in range(0, len(msgs), 100):
            h.add(msgs[start:start + 100])
            h.log.seal()
        outbox = h.make_outbox()
        rows = outbox.next_batch(0, 350)
        outbox.acknowledge(r.seq for r in rows)
        outbox.checkpoint(force=True)
        before = len(list_segments(h.log_dir))
        assert h.log.remove_segments_before(outbox.needed_from()) > 0
        assert len(list_segments(h.log_dir)) < before
        outbox.close()
        again = h.make_outbox()  # everything after the cursor is still there
        assert [r.id for r in again.next_batch(0, 1000)] == [m.id for m in msgs[350:]]
        again.close()


def test_expired_messages_are_dropped_whatever_the_policy(tmp_path: Path):
    with harness(tmp_path) as h:
        old = time.time() - 7200
        h.add([h.row("s", i, ts=old) for i in range(10)] + [h.row("s", i) for i in range(10, 15)])
        outbox = h.make_outbox(bounds(max_age="1h", policy="reject_new"))
        dropped = outbox.enforce()
        assert len(dropped) == 10 and {d.reason for d in dropped} == {"expired"}
        assert outbox.depth().messages == 5
        outbox.close()


@pytest.mark.parametrize(("limit", "reason"), [({"max_messages": 40}, "max_messages"), ("bytes", "max_bytes")])
def test_drop_oldest_keeps_the_newest_within_bounds(tmp_path: Path, limit: dict | str, reason: str):
    with harness(tmp_path) as h:
        msgs = [h.row("s", i, topic="t/" + "x" * 10, payload=b"p" * 25) for i in range(100)]
        h.add(msgs)
        limit = {"max_bytes": sum(m.size for m in msgs[60:])} if limit == "bytes" else limit
        outbox = h.make_outbox(bounds(policy="drop_oldest", **limit))
        dropped = outbox.enforce()
        assert [d.id for d in dropped] == [m.id for m in msgs[:60]]
        assert {d.reason for d in dropped} == {reason}
        assert dropped[0].topic == "t/xxxxxxxxxx" and dropped[0].client_id == "s"
        assert outbox.depth().messages == 40
        assert not outbox.is_full()
        assert outbox.enforce() == []
        assert [r.id for r in outbox.next_batch(0, 100)] == [m.id for m in msgs[60:]]
        outbox.close()


def test_reject_new_drops_nothing_and_reports_full(tmp_path: Path):
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(10)])
        outbox = h.make_outbox(bounds(policy="reject_new", max_messages=10))
        assert outbox.enforce() == []
        assert outbox.is_full()
        outbox.acknowledge([r.seq for r in outbox.next_batch(0, 1)])
        assert not outbox.is_full()
        outbox.close()


def test_messages_handed_to_the_forwarder_are_not_dropped(tmp_path: Path):
    with harness(tmp_path) as h:
        msgs = [h.row("s", i) for i in range(10)]
        h.add(msgs)
        outbox = h.make_outbox(bounds(policy="drop_oldest", max_messages=5))
        rows = outbox.next_batch(0, 3)  # the first three are in flight
        dropped = outbox.enforce(handed_out=rows[-1].seq)
        assert [d.id for d in dropped] == [m.id for m in msgs[3:8]]
        assert [r.id for r in outbox.next_batch(0, 100)] == [m.id for m in msgs[:3] + msgs[8:]]
        outbox.acknowledge(r.seq for r in rows)  # the cursor moves past the dropped ones too
        assert outbox.cursor == outbox.next_batch(0, 1)[0].seq - 1
        outbox.close()


def test_messages_received_while_the_clock_was_wrong_are_not_expired(tmp_path: Path):
    """A gateway without an RTC boots in 1970, buffers, then NTP sets the clock: the backlog's age is
    unknown, not 56 years."""
    with harness(tmp_path) as h:
        h.add([h.row("s", i, ts=86_400.0 + i) for i in range(5)])
        outbox = h.make_outbox(bounds(max_age="1h", policy="drop_oldest"))
        assert outbox.enforce() == []
        assert outbox.depth().messages == 5
        outbox.close()


def test_drops_survive_a_restart_once_saved(tmp_path: Path):
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(50)])
        outbox = h.make_outbox(bounds(policy="drop_oldest", max_messages=20))
        assert len(outbox.enforce()) == 30
        outbox.close()
        again = h.make_outbox(bounds(policy="drop_oldest", max_messages=20))
        assert again.depth().messages == 20 and again.enforce() == []
        again.close()


def test_a_failing_cursor_save_is_reported_and_retried(tmp_path: Path):
    """A full or failing disk under the cursor: the cursor stays where it was saved (a restart would
    resend, never skip), the error shows in last_error, and the next save works again."""
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(20)])
        io = FaultyIO()
        io.sync_error = errno.EIO
        outbox = Outbox.for_log(h.log, Cursor(h.cursor_path, io=io), bounds(), save_every=1)
        rows = outbox.next_batch(0, 20)
        assert outbox.acknowledge(r.seq for r in rows[:10]) == 10  # acknowledged all the same
        assert outbox.saved_cursor == 0 and outbox.needed_from() == 1
        assert outbox.last_error is not None and "cursor save failed" in outbox.last_error and outbox.errors >= 1
        io.sync_error = None
        outbox.acknowledge([rows[10].seq])
        assert outbox.saved_cursor == rows[10].seq == Cursor(h.cursor_path).load()
        assert outbox.last_error is None
        outbox.close()


def test_a_cursor_beyond_the_end_of_the_log_is_not_followed(tmp_path: Path):
    """The log directory was emptied or replaced (seqs start over) but the cursor file stayed:
    following it would skip every message until the new log caught up. Forward the log instead."""
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(10)])
        stale = Cursor(h.cursor_path)
        stale.save(h.log.durable_seq + 1000)
        stale.close()
        outbox = h.make_outbox()
        assert outbox.depth().messages == 10
        assert outbox.last_error is not None and "beyond the end of the log" in outbox.last_error
        rows = outbox.next_batch(0, 4)
        outbox.acknowledge(r.seq for r in rows)
        outbox.close()
        assert Cursor(h.cursor_path).load() == rows[-1].seq  # the stale position is gone for good
        again = h.make_outbox()
        assert again.depth().messages == 6 and again.last_error is None
        again.close()


@pytest.mark.parametrize("read_before", [True, False], ids=["read-for-sending", "indexed-only"])
def test_a_segment_rewritten_under_the_outbox_is_indexed_again(tmp_path: Path, read_before: bool):
    """Something rewrote a sealed segment the outbox still needs (e.g. a purge dropping a record):
    the stale offsets are noticed on the next read and the log is indexed again from the cursor.
    Also when the removed message was only indexed, not yet read for sending: the bodies the last
    look at the log found are kept in memory until sent (with the uplink down, for hours), and the
    forwarder must not send the bytes a purge removed meanwhile."""
    with harness(tmp_path) as h:
        msgs = [h.row("s", i) for i in range(30)]
        h.add(msgs)
        h.log.seal()
        outbox = h.make_outbox()
        rows = outbox.next_batch(0, 5)
        outbox.acknowledge(r.seq for r in rows)
        (segment,) = [info for info in list_segments(h.log_dir) if info.first_seq <= rows[0].seq][-1:]
        if read_before:
            removed = outbox.next_batch(0, 6)[5].seq
        else:
            removed = [r for r in read_segment(segment.path) if r.seq > rows[-1].seq][5].seq
        _rewrite_without(segment, removed)  # "s:10"
        again = outbox.next_batch(0, 100)
        assert [r.payload for r in again] == [m.payload for m in msgs[5:] if m.payload != b"s:10"]
        assert outbox.depth().messages == 24
        outbox.close()


def test_a_rewrite_of_any_segment_of_a_batch_read_from_memory_is_noticed(tmp_path: Path):
    """The batch spans two segments and the second one is rewritten: each segment is looked at."""
    with harness(tmp_path) as h:
        msgs = [h.row("s", i) for i in range(30)]
        h.add(msgs[:15])
        h.log.seal()
        h.add(msgs[15:])
        h.log.seal()
        outbox = h.make_outbox()
        rows = outbox.next_batch(0, 5)
        outbox.acknowledge(r.seq for r in rows)
        first, second = [info for info in list_segments(h.log_dir) if info.first_seq <= rows[-1].seq][-1:] + [
            info for info in list_segments(h.log_dir) if info.first_seq > rows[-1].seq][:1]
        assert first.first_seq < second.first_seq
        records = list(read_segment(second.path))
        removed = records[5].seq  # "s:20"
        _rewrite_without(second, removed)
        again = outbox.next_batch(0, 100)
        assert [r.payload for r in again] == [m.payload for m in msgs[5:] if m.payload != b"s:20"]
        assert outbox.depth().messages == 24
        outbox.close()


def _rewrite_without(segment: SegmentInfo, seq: int) -> None:
    """Rewrite a segment without one record, as a purge does (a new file renamed over it)."""
    kept = [r for r in read_segment(segment.path) if r.seq != seq]
    replacement = segment.path.with_suffix(".new")
    replacement.write_bytes(encode_file_header(segment.first_seq) + b"".join(encode_record(*r) for r in kept))
    os.replace(replacement, segment.path)


def _kept_in_memory(outbox: Outbox) -> list[int]:
    """The seqs whose bodies the outbox keeps for sending (white box: they use a bounded budget)."""
    fresh = outbox._fresh
    assert outbox._fresh_bytes == sum(RECORD_HEADER_SIZE + len(body) for _, body in fresh.values())
    return list(fresh)


def test_bodies_nobody_will_ask_for_are_not_kept_in_memory(tmp_path: Path):
    """After reload() the messages in flight (handed out, not acknowledged) are indexed again, but
    they are not read for sending again on this connection: their bodies are not kept. Nor are the
    bodies of messages before the ones asked for."""
    with harness(tmp_path) as h:
        msgs = [h.row("s", i) for i in range(40)]
        h.add(msgs)
        outbox = h.make_outbox()
        sent = outbox.next_batch(0, 10)
        outbox.reload()
        assert outbox.depth().messages == 40
        assert _kept_in_memory(outbox) and min(_kept_in_memory(outbox)) > sent[-1].seq
        rows = outbox.next_batch(sent[-1].seq, 10)
        assert [r.payload for r in rows] == [m.payload for m in msgs[10:20]]
        assert min(_kept_in_memory(outbox)) > rows[-1].seq

        skipped_to = outbox.next_batch(rows[-1].seq + 5, 5)  # five left behind (messages never asked for)
        assert [r.payload for r in skipped_to] == [m.payload for m in msgs[25:30]]
        kept = _kept_in_memory(outbox)
        later = outbox.next_batch(skipped_to[-1].seq, 100)
        assert [r.payload for r in later] == [m.payload for m in msgs[30:]]
        assert kept == [r.seq for r in later]
        assert _kept_in_memory(outbox) == []
        outbox.close()


@pytest.mark.parametrize("body", [b"", b"\x10\x00\x00"])
def test_a_message_record_that_cannot_be_decoded_is_reported_and_passed_over(tmp_path: Path, body: bytes):
    """A compact decision whose body is too short even for its flags and receive time (written so,
    its CRC is right): an error in last_error, not a crash of the forwarder thread."""
    with harness(tmp_path) as h:
        h.add([h.row("s", 0)])
        h.call(lambda: h.log.append(COMPACT_DECISION, body))
        h.add([h.row("s", 1)])
        outbox = h.make_outbox()
        assert [r.payload for r in outbox.next_batch(0, 10)] == [b"s:0", b"s:1"]
        assert outbox.last_error is not None and "cannot be decoded" in outbox.last_error
        outbox.close()


@pytest.mark.parametrize("from_the_log", [False, True])
def test_a_message_that_cannot_be_decoded_when_read_for_sending_is_reported_and_passed_over(tmp_path: Path,
                                                                                            from_the_log: bool):
    """A compact decision to forward whose flags and receive time read but nothing after them: it
    is indexed (the index reads only those), and refused when read for sending, from the bodies
    kept in memory or from the log. An error in last_error, and the message leaves the outbox
    (not a crash of the forwarder thread, again at every start)."""
    with harness(tmp_path) as h:
        h.add([h.row("s", 0)])
        h.call(lambda: h.log.append(COMPACT_DECISION, b"\x10\x00" + bytes(8)))  # F_FORWARD, ts 0.0, then nothing
        h.add([h.row("s", 1)])
        outbox = h.make_outbox()
        assert outbox.depth().messages == 3
        if from_the_log:
            assert [r.payload for r in outbox.next_batch(0, 1)] == [b"s:0"]  # sent again below: read back
        rows = outbox.next_batch(0, 10)
        assert [r.payload for r in rows] == [b"s:0", b"s:1"]
        assert outbox.last_error is not None and "cannot be decoded" in outbox.last_error
        assert outbox.depth().messages == 2
        outbox.acknowledge(r.seq for r in rows)
        assert outbox.cursor == rows[-1].seq and outbox.depth().messages == 0
        outbox.close()
        again = h.make_outbox()
        assert again.depth().messages == 0
        again.close()


def test_the_saved_cursor_never_passes_what_the_log_synced(tmp_path: Path):
    """os_buffered: a record counts as stored (and is forwarded) once written to the OS, and is
    synced every `interval`. A power cut then takes the unsynced records and the log hands their
    seqs out again: a cursor saved past them would skip the new records that get those seqs."""
    io = CrashIO(tmp_path / "state", rng=random.Random(7))
    directory, cursor_path = tmp_path / "state" / "log", tmp_path / "state" / "forward" / "cursor"
    with harness(tmp_path / "rows") as h:
        before = [h.row("before", i) for i in range(20)]
        after = [h.row("after", i) for i in range(30)]
    message_log = MessageLog(directory, io=io, policy=SyncPolicy(mode="os_buffered", interval=3600.0))
    message_log.open()
    message_log.start()
    for msg in before:
        message_log.append(msg.kind.code, msg.kind.encode(msg.row))
    wait_until(lambda: message_log.durable_seq == message_log.last_seq, message="written to the OS")
    outbox = Outbox.for_log(message_log, Cursor(cursor_path, io=io), bounds())
    rows = outbox.next_batch(0, 100)
    assert len(rows) == 20  # forwarded although not synced yet
    outbox.acknowledge(r.seq for r in rows)
    outbox.checkpoint(force=True)
    assert outbox.saved_cursor <= message_log.synced_seq < message_log.durable_seq
    io.crash()  # power cut: the 20 unsynced records are gone
    message_log.stop()
    io.revive()

    message_log = MessageLog(directory, io=io)
    message_log.open()
    message_log.start()
    for msg in after:  # they get the seqs of the lost ones, and more
        message_log.append(msg.kind.code, msg.kind.encode(msg.row))
    wait_until(lambda: message_log.durable_seq == message_log.last_seq, message="durable")
    again = Outbox.for_log(message_log, Cursor(cursor_path, io=io), bounds())
    got = [r.payload for r in again.next_batch(0, 100)]
    assert [m.payload for m in after] == got[-30:]  # none skipped
    assert again.last_error is None
    again.close()
    outbox.close()
    message_log.stop()


def test_damage_in_the_newest_segment_before_durable_records_is_reported(tmp_path: Path):
    """Forwarding cannot pass a damaged record in the active segment: that is not a silent stall,
    it is an error in last_error (and the forwarder's status and outbox_error event)."""
    with harness(tmp_path) as h:
        h.add([h.row("s", i) for i in range(10)])
        (segment,) = list_segments(h.log_dir)[-1:]
        data = bytearray(segment.path.read_bytes())
        data[data.index(b"s:4") + 2] ^= 0x01  # bit rot in the 5th message's payload
        segment.path.write_bytes(bytes(data))
        outbox = h.make_outbox()
        assert outbox.depth().messages == 4
        assert outbox.last_error is not None and "damaged record in the newest log segment" in outbox.last_error
        outbox.close()


def test_a_backlog_larger_than_one_catch_up_read_is_indexed_whole_and_in_order(tmp_path: Path):
    from appliance.forward import outbox as outbox_module

    count = 2 * outbox_module.CATCH_UP_BATCH + 7
    with harness(tmp_path) as h:
        msgs = [h.row(f"sensor-{i % 5}", i) for i in range(count)]
        assert h.add(msgs) == count
        outbox = h.make_outbox()
        assert outbox.depth().messages == count
        assert outbox.depth().bytes == sum(m.size for m in msgs)
        rows = outbox.next_batch(0, count + 10)
        assert [r.id for r in rows] == [m.id for m in msgs]
        outbox.close()
