"""SQL downloads are streamed, over HTTP against a real console and appliance: a result larger than
one piece arrives whole and in order, in bounded pieces (each HTTP chunk is one piece the console
had in memory), the row limit holds, and the console's peak memory does not grow with the result."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import uvicorn

from appliance.config import load_config
from appliance.console.download import CHUNK_BYTES, FILE_PIECE, FIRST_ROWS, TOO_LARGE
from appliance.console.web import SQL_DOWNLOAD_ROWS, Console, build
from tests.console.conftest import VIEWER, VIEWER_PASSWORD, Browser, Setup
from tests.helpers import scaled, wait_until
from tests.processes import free_port


def viewer(setup: Setup) -> Browser:
    browser = Browser(setup.console_port)
    assert browser.login(VIEWER, VIEWER_PASSWORD) == 303
    return browser


def download(browser: Browser, sql: str, fmt: str, *, gzip: bool = False) -> tuple[int, dict[str, str], list[bytes]]:
    """GET /sql/download over a plain socket: status, headers and the body's HTTP chunks as sent
    (`gzip`: accepting gzip, as browsers do)."""
    path = f"/sql/download?format={fmt}&q={urllib.parse.quote(sql)}"
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    accept = "Accept-Encoding: gzip\r\n" if gzip else ""
    with socket.create_connection(("127.0.0.1", browser.port), timeout=300) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{browser.port}\r\nCookie: {cookie}\r\n{accept}"
                     "Connection: close\r\n\r\n".encode())
        stream = sock.makefile("rb")
        status = int(stream.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := stream.readline().decode("latin-1").strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        chunks: list[bytes] = []
        if headers.get("transfer-encoding") == "chunked":
            while (size := int(stream.readline().split(b";")[0], 16)):
                chunks.append(stream.read(size))
                assert stream.read(2) == b"\r\n"
            assert stream.readline() == b"\r\n", "the last chunk: the response is complete"
        else:
            chunks.append(stream.read())
    return status, headers, chunks


def peak_rss_kb(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), from the kernel."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_csv_download_of_many_pieces_is_whole_and_in_order(running: Setup) -> None:
    browser = viewer(running)
    rows = 200_000  # ~3.4 MB of CSV: a dozen pieces
    status, headers, chunks = download(browser, f"SELECT i AS n, 'row-' || i AS label FROM range({rows}) t(i)", "csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert headers["x-row-limit"] == str(SQL_DOWNLOAD_ROWS)
    expected = "n,label\n" + "".join(f"{i},row-{i}\n" for i in range(rows))
    assert b"".join(chunks).decode() == expected
    assert len(chunks) >= len(expected) // (2 * CHUNK_BYTES)
    assert max(len(c) for c in chunks) <= 2 * CHUNK_BYTES  # one step's rows at a time


def test_a_browser_gets_the_csv_gzipped_as_it_is_streamed(running: Setup) -> None:
    browser = viewer(running)
    rows = 200_000
    status, headers, chunks = download(browser, f"SELECT i AS n, md5(i::VARCHAR) AS d FROM range({rows}) t(i)", "csv",
                                       gzip=True)
    assert status == 200 and headers.get("content-encoding") == "gzip"
    text = zlib.decompress(b"".join(chunks), wbits=31).decode()
    assert text == "n,d\n" + "".join(f"{i},{hashlib.md5(str(i).encode()).hexdigest()}\n" for i in range(rows))
    assert len(chunks) > 5  # compressed piece by piece, not once at the end


def test_the_row_limit_holds_and_the_peak_memory_does_not_grow_with_the_result(running: Setup) -> None:
    """1.2 M rows of ~170 bytes asked for (~200 MB of CSV): exactly SQL_DOWNLOAD_ROWS arrive (~170
    MB), and the console's peak RSS grows by far less than that: the result is never held whole.
    (Before streaming, the same download held every row and the CSV text at once.)"""
    assert running.console is not None
    browser = viewer(running)
    pad = "x" * 150
    sql = f"SELECT i AS n, '{pad}' AS pad FROM range({SQL_DOWNLOAD_ROWS + 200_000}) t(i)"
    warm, _, _ = download(browser, sql.replace(str(SQL_DOWNLOAD_ROWS + 200_000), "20000"), "csv")
    assert warm == 200  # the code paths loaded and used once before the baseline
    before = peak_rss_kb(running.console.pid)
    status, _, chunks = download(browser, sql, "csv")
    grown_mb = (peak_rss_kb(running.console.pid) - before) / 1024
    assert status == 200
    total = sum(len(c) for c in chunks)
    lines = b"".join(chunks).split(b"\n")
    assert lines[0] == b"n,pad" and lines[-1] == b""
    assert len(lines) - 2 == SQL_DOWNLOAD_ROWS
    assert lines[-2] == f"{SQL_DOWNLOAD_ROWS - 1},{pad}".encode()
    assert total > 150 * 1024 * 1024
    assert max(len(c) for c in chunks) <= 2 * CHUNK_BYTES
    print(f"peak RSS growth {grown_mb:.1f} MB for {total >> 20} MB in {len(chunks)} chunks")
    assert grown_mb < 40, f"the console's peak RSS grew by {grown_mb:.0f} MB for a {total >> 20} MB download"


def test_a_parquet_download_larger_than_a_piece_holds_every_row(running: Setup, tmp_path: Path) -> None:
    browser = viewer(running)
    rows = 300_000
    sql = f"SELECT i AS n, md5(i::VARCHAR) AS digest, i % 7 = 0 AS seventh FROM range({rows}) t(i)"
    status, headers, chunks = download(browser, sql, "parquet")
    assert status == 200 and headers["content-type"] == "application/vnd.apache.parquet", b"".join(chunks)[:500]
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= FILE_PIECE
    data = b"".join(chunks)
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    (tmp_path / "r.parquet").write_bytes(data)
    con = duckdb.connect()
    got = con.execute(f"SELECT count(*), sum(n), count(*) FILTER (WHERE seventh), "
                      f"bool_and(digest = md5(n::VARCHAR)) FROM '{tmp_path / 'r.parquet'}'").fetchone()
    assert got == (rows, rows * (rows - 1) // 2, (rows + 6) // 7, True)
    assert con.execute(f"SELECT n FROM '{tmp_path / 'r.parquet'}' LIMIT 3").fetchall() == [(0,), (1,), (2,)]
    # Nothing left behind: the staging database and the file are removed once sent.
    assert not [p for p in (running.state_dir / "audit" / "tmp").glob("download-*")]


def test_a_parquet_download_does_not_hold_the_result_either(running: Setup, tmp_path: Path) -> None:
    """1 M rows of ~160 bytes (~160 MB as Python rows; the file is small, the text repeats): staged
    a step at a time, the console's peak RSS grows by far less than the rows would take."""
    assert running.console is not None
    browser = viewer(running)
    sql = f"SELECT i AS n, '{'x' * 150}' || i AS pad FROM range({{rows}}) t(i)"
    assert download(browser, sql.format(rows=20_000), "parquet")[0] == 200  # warmed up before the baseline
    before = peak_rss_kb(running.console.pid)
    status, _, chunks = download(browser, sql.format(rows=SQL_DOWNLOAD_ROWS), "parquet")
    grown_mb = (peak_rss_kb(running.console.pid) - before) / 1024
    assert status == 200
    (tmp_path / "r.parquet").write_bytes(b"".join(chunks))
    got = duckdb.connect().execute(f"SELECT count(*), max(n), min(length(pad)) FROM '{tmp_path / 'r.parquet'}'").fetchone()
    assert got == (SQL_DOWNLOAD_ROWS, SQL_DOWNLOAD_ROWS - 1, 151)
    print(f"peak RSS growth {grown_mb:.1f} MB for {SQL_DOWNLOAD_ROWS} rows ({len(b''.join(chunks)) >> 20} MB file)")
    assert grown_mb < 40, f"the console's peak RSS grew by {grown_mb:.0f} MB"


def test_a_query_that_fails_is_a_400_before_anything_is_sent(running: Setup) -> None:
    browser = viewer(running)
    for fmt in ("csv", "parquet"):
        status, _, chunks = download(browser, "SELECT 1 / 0 AS x, error('boom') FROM range(10)", fmt)
        assert status == 400 and b"boom" in b"".join(chunks)
    status, _, chunks = download(browser, "SELECT 1", "xlsx")
    assert status == 400 and b"unknown format" in b"".join(chunks)


def test_a_client_that_goes_away_midway_ends_the_download(running: Setup) -> None:
    """The client takes one piece and closes the connection: the console closes the download
    (its query and scratch files; the snapshot it borrowed) and answers the next one as usual."""
    browser = viewer(running)
    scratch = running.state_dir / "audit" / "tmp"
    path = "/sql/download?format=parquet&q=" + urllib.parse.quote(
        f"SELECT i, md5(i::VARCHAR) AS d, md5(d) AS e FROM range({SQL_DOWNLOAD_ROWS}) t(i)")  # ~45 MB: more
    # than the sockets' buffers hold, so the console is still sending when the client goes away
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    with socket.create_connection(("127.0.0.1", browser.port), timeout=120) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{browser.port}\r\nCookie: {cookie}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        staging = [p for p in scratch.glob("download-*")]
        assert staging, "the download is under way"
        # The staging database (a copy of the rows) is gone once the file is written, and the
        # file is unlinked while open: nothing of the rows is left in a directory to be found.
        assert [list(p.iterdir()) for p in staging] == [[]]
    wait_until(lambda: not [p for p in scratch.glob("download-*")], timeout=scaled(30),
               message="the download closed after the client went away")
    status, _, chunks = download(browser, "SELECT 42 AS answer", "csv")
    assert status == 200 and b"".join(chunks) == b"answer\n42\n"


@contextlib.contextmanager
def console_with(setup: Setup, **limits: Any) -> Iterator[Browser]:
    """A second console on the same appliance, in this process (uvicorn on a thread, over HTTP)
    with some of its limits lowered (`Console` attributes: download_rows, stage_max_bytes,
    stage_reserve_bytes); a viewer's browser logged in to it."""
    console = Console(load_config(setup.config), login=True, secure=False)
    for name, value in limits.items():
        assert hasattr(console, name), name
        setattr(console, name, value)
    server = uvicorn.Server(uvicorn.Config(build(console), host="127.0.0.1", port=free_port(), log_config=None,
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=scaled(30), message="console started")
        assert server.started
        browser = Browser(server.config.port)
        assert browser.login(VIEWER, VIEWER_PASSWORD) == 303
        yield browser
    finally:
        server.should_exit = True
        thread.join(scaled(30))


def parquet_rows(data: bytes, tmp_path: Path) -> tuple[Any, ...] | None:
    (tmp_path / "r.parquet").write_bytes(data)
    return duckdb.connect().execute(f"SELECT count(*), max(n) FROM '{tmp_path / 'r.parquet'}'").fetchone()


def test_a_download_cut_at_the_row_limit_says_so(running: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The limit lowered to the first step's size (the step that asks for exactly the rows left
    must still find out whether there are more): limit + 1 rows give `limit` rows; the Parquet
    download says it was cut (X-Truncated, the file's name); the CSV one, whose headers went out
    first, is logged as cut. A result of exactly `limit` rows is whole and says nothing."""
    limit = FIRST_ROWS
    sql = "SELECT i AS n FROM range({rows}) t(i)"
    with console_with(running, download_rows=limit) as browser:
        status, headers, chunks = download(browser, sql.format(rows=limit + 1), "parquet")
        assert status == 200 and headers["x-truncated"] == "true" and headers["x-row-limit"] == str(limit)
        assert f'filename="audit-query-first-{limit}-rows.parquet"' in headers["content-disposition"]
        assert parquet_rows(b"".join(chunks), tmp_path) == (limit, limit - 1)
        status, headers, chunks = download(browser, sql.format(rows=limit), "parquet")
        assert status == 200 and "x-truncated" not in headers
        assert 'filename="audit-query.parquet"' in headers["content-disposition"]
        assert parquet_rows(b"".join(chunks), tmp_path) == (limit, limit - 1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="appliance.console.web"):
            status, headers, chunks = download(browser, sql.format(rows=limit), "csv")
            assert status == 200 and b"".join(chunks).count(b"\n") == limit + 1
            assert not [r for r in caplog.records if "cut at the row limit" in r.getMessage()]
            status, headers, chunks = download(browser, sql.format(rows=limit + 1), "csv")
            assert status == 200 and b"".join(chunks).count(b"\n") == limit + 1  # the header and `limit` rows
            wait_until(lambda: [r for r in caplog.records if "cut at the row limit" in r.getMessage()],
                       message="the cut CSV download logged")


def test_a_parquet_download_too_large_for_its_staging_is_refused(running: Setup) -> None:
    """~1 kB rows, 200,000 of them asked for as Parquet (~200 MB to stage): with the staging
    limited to 4 MB the console stops at once, answers 400 saying why, and leaves nothing on disk;
    the same with too little free space left on the disk."""
    scratch = running.state_dir / "audit" / "tmp"
    sql = "SELECT i AS n, repeat(md5(i::VARCHAR), 30) AS pad FROM range(200000) t(i)"
    with console_with(running, stage_max_bytes=4 << 20) as browser:
        status, _, chunks = download(browser, sql, "parquet")
        assert status == 400 and TOO_LARGE in b"".join(chunks).decode(), b"".join(chunks)[:300]
        assert not list(scratch.glob("download-*"))
        status, _, chunks = download(browser, sql.replace("200000", "100"), "parquet")
        assert status == 200  # a small one still goes
    with console_with(running, stage_reserve_bytes=1 << 60) as browser:
        status, _, chunks = download(browser, sql, "parquet")
        assert status == 400 and "nearly full" in b"".join(chunks).decode(), b"".join(chunks)[:300]
        assert not list(scratch.glob("download-*"))


def test_a_console_start_removes_the_staging_left_by_a_dead_console(running: Setup) -> None:
    """A console killed mid-download (SIGKILL, OOM) leaves its staging directory, named with its
    pid; the next console start removes it. One of a console still running stays."""
    scratch = running.state_dir / "audit" / "tmp"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)
    stale = scratch / f"download-{dead_pid}-abc123"
    live = scratch / f"download-{os.getpid()}-def456"
    for path in (stale, live):
        path.mkdir(parents=True)
        (path / "stage.duckdb").write_bytes(b"rows of a download" * 1000)
    try:
        with console_with(running):
            assert not stale.exists()
            assert (live / "stage.duckdb").exists()
    finally:
        for path in (stale, live):
            if path.exists():
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()


def test_a_parquet_download_is_not_gzipped(running: Setup) -> None:
    """Parquet is zstd-compressed already: gzip would only cost the console's CPU, even for a
    browser that accepts it (CSV still is gzipped: test_a_browser_gets_the_csv_gzipped...)."""
    browser = viewer(running)
    status, headers, chunks = download(browser, "SELECT i AS n, md5(i::VARCHAR) AS d FROM range(20000) t(i)",
                                       "parquet", gzip=True)
    assert status == 200 and "content-encoding" not in headers
    data = b"".join(chunks)
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"


def test_wide_rows_make_small_first_steps(running: Setup) -> None:
    """Rows of 64 kB: before any row's size is known the first step takes only a few of them, so
    no piece of the CSV is much over CHUNK_BYTES (a first step of 256 rows held 16 MB)."""
    browser = viewer(running)
    status, _, chunks = download(browser, "SELECT i AS n, repeat('x', 65536) AS wide FROM range(300) t(i)", "csv")
    assert status == 200
    lines = b"".join(chunks).split(b"\n")
    assert len(lines) - 2 == 300 and all(len(line) == len(str(i)) + 1 + 65536 for i, line in enumerate(lines[1:-1]))
    assert max(len(c) for c in chunks) <= 16 * 65_600, f"a piece of {max(len(c) for c in chunks) >> 10} kB"
