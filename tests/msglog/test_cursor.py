"""The reader's cursor: two CRC'd slots written alternately, each synced."""

from __future__ import annotations

import random
from pathlib import Path

from appliance.msglog import Cursor
from appliance.msglog.cursor import SLOT_SPACING
from appliance.msglog.testing import CrashIO


def test_load_without_a_file_is_zero(tmp_path: Path) -> None:
    assert Cursor(tmp_path / "cursor").load() == 0


def test_save_load_and_never_backwards(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cursor"
    cursor = Cursor(path)
    cursor.save(10)
    cursor.save(25)
    cursor.save(7)  # going back is a no-op
    assert cursor.seq == 25
    cursor.close()
    assert Cursor(path).load() == 25
    again = Cursor(path)
    again.save(3)
    assert again.load() == 25


def test_a_torn_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    path = tmp_path / "cursor"
    cursor = Cursor(path)
    cursor.save(10)  # generation 1: slot 1
    cursor.save(20)  # generation 2: slot 0
    cursor.close()
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # damage slot 0, the newest
    path.write_bytes(bytes(data))
    assert Cursor(path).load() == 10
    data[SLOT_SPACING + 12] ^= 0xFF  # both damaged: as if never saved
    path.write_bytes(bytes(data))
    assert Cursor(path).load() == 0
    # A cursor that loaded a fallback keeps going forward from it.
    cursor = Cursor(path)
    cursor.save(30)
    cursor.close()
    assert Cursor(path).load() == 30


def test_power_cut_during_save_keeps_the_old_or_the_new_value(tmp_path: Path) -> None:
    rng = random.Random(5)
    io = CrashIO(tmp_path / "state", rng=rng)
    path = tmp_path / "state" / "forward" / "cursor"
    saved = 0
    for _ in range(200):
        cursor = Cursor(path, io=io)
        loaded = cursor.load()
        assert loaded >= saved, "a completed save was lost"
        saved = loaded
        io.crash_at = io.ops + rng.randrange(1, 12)
        attempted = saved
        try:
            for _ in range(rng.randrange(1, 4)):
                attempted += rng.randrange(1, 100)
                cursor.save(attempted)
                saved = attempted  # save() returned: durable
        except OSError:
            pass
        if not io.frozen:
            io.crash()
        cursor.close()
        io.revive()
        value = Cursor(path, io=io).load()
        assert saved <= value <= attempted, (saved, value, attempted)
    assert io.crashes == 200 and saved > 0
