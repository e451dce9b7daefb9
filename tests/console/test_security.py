"""The console's security, against a real console process in front of a real appliance: no session,
a viewer attempting an operator action, forged cross-site and token-less POSTs, SQL that writes or
reads files, path traversal in the schema-trial directory, markup in topics, client ids and
payloads, the login rate limit and the binds the console refuses."""

from __future__ import annotations

import contextlib
import html
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appliance import admin
from tests.console.conftest import (
    OPERATOR,
    OPERATOR_PASSWORD,
    VIEWER,
    VIEWER_PASSWORD,
    Browser,
    Setup,
    stop,
    write_setup,
)
from tests.governance.payloads import temperature
from tests.helpers import Client, wait_until
from tests.processes import can_connect, free_port

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def quarantined_ids(setup: Setup, client_id: str) -> list[int]:
    result = subprocess.run([sys.executable, "-m", "appliance", "quarantine", "list", "--state-dir", str(setup.state_dir),
                             "--format", "json"], capture_output=True, text=True, check=True)
    return [int(row["id"]) for row in json.loads(result.stdout)["rows"] if row["client_id"] == client_id]


@pytest.fixture(scope="module")
def rejected(running: Setup) -> dict[str, object]:
    """A rejected message whose client id, topic level and payload carry markup."""
    client_id = f"evil{EVIL}"
    publisher = Client(running.mqtt_port, client_id=client_id).connect()
    payload = temperature(device_id=EVIL, temperature=EVIL)  # type: ignore[arg-type]  # not a number on purpose
    publisher.publish(f"events/{EVIL}", payload, qos=1).wait_for_publish(10)
    wrong = temperature(device_id="t1", temperature=EVIL)  # type: ignore[arg-type]  # not a number on purpose
    publisher.publish("sensor/t1/temperature", wrong, qos=1).wait_for_publish(10)
    publisher.disconnect()
    ids = wait_until(lambda: quarantined_ids(running, client_id), message="the rejected message in the quarantine")
    return {"client_id": client_id, "id": ids[0]}


def operator(running: Setup) -> Browser:
    browser = Browser(running.console_port)
    assert browser.login(OPERATOR, OPERATOR_PASSWORD) == 303
    return browser


def viewer(running: Setup) -> Browser:
    browser = Browser(running.console_port)
    assert browser.login(VIEWER, VIEWER_PASSWORD) == 303
    return browser


PAGES = ["/", "/verdicts", "/quarantine", "/sql?q=SELECT+1", "/clients", "/trials", "/api/chart", "/events",
         "/verdicts/stream", "/messages/1", "/sql/download?format=csv&q=SELECT+1"]


@pytest.mark.parametrize("path", PAGES)
def test_no_session_sees_nothing(running: Setup, path: str) -> None:
    browser = Browser(running.console_port)
    status, headers, text = browser.request("GET", path, headers={"Accept": "application/json"})
    assert status == 401
    status, headers, _ = browser.request("GET", path)  # a browser navigating: sent to the login page
    assert status in (303, 401)
    if status == 303:
        assert headers["location"].startswith("/login")


@pytest.mark.parametrize("path", ["/quarantine/release", "/quarantine/purge", "/reload", "/trials/run", "/trials/diff",
                                  "/logout"])
def test_no_session_cannot_post(running: Setup, path: str) -> None:
    status, _ = Browser(running.console_port).post(path, {"id": "1", "directory": "x"}, csrf="anything")
    assert status == 401


def test_session_cookie_is_httponly_and_samesite_strict(running: Setup) -> None:
    browser = operator(running)
    cookie = browser.set_cookie_headers[-1]
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    status, text = browser.get("/")
    assert status == 200, running.console_output()[-3000:]


def test_wrong_password_and_unlisted_user_are_refused(running: Setup, tmp_path: Path) -> None:
    browser = Browser(running.console_port)
    assert browser.login(OPERATOR, "wrong") == 401
    assert browser.login("nobody", OPERATOR_PASSWORD) == 401
    assert browser.cookies == {}


@contextlib.contextmanager
def second_console(running: Setup) -> Iterator[int]:
    """A console of its own on the same appliance (its login limits start empty); yields its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "console", "--config", str(running.config),
                             "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: can_connect(port), message="second console")
        yield port
    finally:
        stop(proc)  # type: ignore[arg-type]


def test_login_is_rate_limited(running: Setup) -> None:
    # A console of its own (on the same appliance): the limit also counts per client address, and
    # every test here comes from 127.0.0.1.
    with second_console(running) as port:
        browser = Browser(port)
        codes = [browser.login(VIEWER, f"wrong-{i}") for i in range(6)]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        assert browser.login(VIEWER, VIEWER_PASSWORD) == 429  # even the right password, until the window passes
        assert browser.login(OPERATOR, OPERATOR_PASSWORD) == 429  # the address is limited too


def test_concurrent_wrong_logins_get_at_most_the_limit(running: Setup) -> None:
    # Logins that arrive together all wait for the password check at once: each must count before
    # it is checked, or all of them pass the limit's test before the first failure is recorded.
    with second_console(running) as port:
        barrier = threading.Barrier(24)

        def attempt(i: int) -> int:
            barrier.wait()
            return Browser(port).login(VIEWER, f"wrong-{i}")

        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(attempt, range(24)))
        assert set(codes) <= {401, 429}, codes
        assert codes.count(401) <= 5, codes  # console.login_attempts: 5 by default
        assert codes.count(429) >= 19, codes
        assert Browser(port).login(VIEWER, VIEWER_PASSWORD) == 429


def raw_post(port: int, head: str, body: bytes) -> bytes:
    """Send a request's head and part of its body, and read what the console answers meanwhile (a
    console that waited for the whole body would answer nothing: the socket times out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        return answer


def test_an_oversized_login_body_is_refused_before_it_is_read(running: Setup) -> None:
    host = f"127.0.0.1:{running.console_port}"
    # A declared length of 1 GB: refused at once, after a few bytes of it.
    head = (f"POST /login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n")
    assert raw_post(running.console_port, head, b"user=x&password=").startswith(b"HTTP/1.1 413"), "declared length"
    # No declared length (chunked, never ending): refused once more than the cap has arrived.
    head = (f"POST /login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 65536
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(5))
    assert raw_post(running.console_port, head, body).startswith(b"HTTP/1.1 413"), "chunked"
    # A body within the cap is still a login.
    assert Browser(running.console_port).login(OPERATOR, OPERATOR_PASSWORD) == 303


def test_login_next_is_never_another_site(running: Setup) -> None:
    browser = Browser(running.console_port)
    status, headers, _ = browser.request("POST", "/login", {"user": OPERATOR, "password": OPERATOR_PASSWORD,
                                                             "next": "//evil.example/x"})
    assert status == 303 and headers["location"] == "/"


def test_viewer_cannot_release_or_purge(running: Setup, rejected: dict[str, object]) -> None:
    browser = viewer(running)
    token = browser.csrf()
    for action in ("release", "purge"):
        status, text = browser.post(f"/quarantine/{action}", {"id": str(rejected["id"])}, csrf=token)
        assert status == 403, text
        assert "viewer" in text
    assert rejected["id"] in quarantined_ids(running, str(rejected["client_id"]))
    _, page = browser.get("/quarantine")
    assert 'id="release"' not in page and 'id="purge"' not in page


def test_viewer_cannot_run_a_trial(running: Setup) -> None:
    browser = viewer(running)
    status, text = browser.post("/trials/run", {"directory": "v2"}, csrf=browser.csrf())
    assert status == 403, text
    assert f"{VIEWER} is a viewer: only operators may do this" in text


def reloads(setup: Setup) -> dict[str, int]:
    return dict(admin.call(setup.state_dir, "status", timeout=30)["status"]["reloads"])


def reload_events(setup: Setup) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, "-m", "appliance", "audit", "sql", "--state-dir", str(setup.state_dir),
                           "--format", "json", "SELECT detail FROM events WHERE kind = 'reload_requested'"],
                          capture_output=True, text=True, timeout=120, check=True)
    details = [row["detail"] for row in json.loads(done.stdout)["rows"]]
    return [json.loads(d) if isinstance(d, str) else d for d in details]


def test_an_operator_reloads_the_appliance_and_is_recorded(running: Setup) -> None:
    browser = operator(running)
    _, page = browser.get("/")
    assert 'id="reload"' in page and "hx-confirm" in page
    before = reloads(running).get("ok", 0)
    status, text = browser.post("/reload", {}, csrf=browser.csrf())
    assert status == 200, text
    assert "reloaded" in text
    assert reloads(running).get("ok", 0) == before + 1
    events = wait_until(lambda: [e for e in reload_events(running) if e.get("console_user") == OPERATOR],
                        message="the reload_requested event")
    assert events[-1]["reloaded"] is True and events[-1]["via"] == "console" and events[-1].get("by")


def test_a_viewer_cannot_reload_nor_a_post_without_token(running: Setup) -> None:
    before = reloads(running)
    browser = viewer(running)
    _, page = browser.get("/")
    assert 'id="reload"' not in page
    status, text = browser.post("/reload", {}, csrf=browser.csrf())
    assert status == 403 and "viewer" in text
    status, text = operator(running).post("/reload", {})
    assert status == 403 and "CSRF" in text
    status, _ = Browser(running.console_port).post("/reload", {}, csrf="anything")
    assert status == 401
    assert reloads(running) == before


@pytest.mark.parametrize("text", ["\u00b2", "\u0661", "1\u00b2", str(2**63), "9" * 40, "-1", "0x1"])
def test_a_message_id_that_is_not_a_bigint_is_a_bad_request(running: Setup, rejected: dict[str, object],
                                                             text: str) -> None:
    # "²" and "١" (Arabic-Indic one) pass str.isdigit() but not int(); 2**63 does not fit the store's BIGINT.
    browser = operator(running)
    status, page = browser.get(f"/messages/{urllib.parse.quote(text)}")
    assert status in (400, 404), page
    assert "not a message id" in page or status == 404
    token = browser.csrf()
    for action in ("release", "purge"):
        status, page = browser.post(f"/quarantine/{action}", {"id": [str(rejected["id"]), text]}, csrf=token)
        assert status == 400, page
        assert "not a message id" in page
    assert rejected["id"] in quarantined_ids(running, str(rejected["client_id"]))


def test_forged_cross_site_post_is_refused(running: Setup, rejected: dict[str, object]) -> None:
    browser = operator(running)
    token = browser.csrf()
    # A page elsewhere posting with the operator's cookie: the browser says where it comes from.
    status, text = browser.post("/quarantine/purge", {"id": str(rejected["id"]), "csrf": token},
                                origin="http://evil.example")
    assert status == 403 and "cross-site" in text
    status, _ = browser.post("/quarantine/purge", {"id": str(rejected["id"])}, origin="null", csrf=token)
    assert status == 403
    # No token, or another session's token: refused even from the same origin.
    assert browser.post("/quarantine/purge", {"id": str(rejected["id"])}, origin=running.url)[0] == 403
    other = operator(running).csrf()
    assert browser.post("/quarantine/purge", {"id": str(rejected["id"])}, origin=running.url, csrf=other)[0] == 403
    assert rejected["id"] in quarantined_ids(running, str(rejected["client_id"]))


@pytest.mark.parametrize(("sql", "why"), [
    ("COPY (SELECT 1) TO '/tmp/console-sql-test.csv'", "COPY"),
    ("CREATE TABLE x AS SELECT 1", "writes are not allowed"),
    ("DELETE FROM decisions", "writes are not allowed"),
    ("SELECT * FROM read_csv('/etc/passwd')", "reading files is not allowed"),
    ("SELECT * FROM '/etc/passwd'", "reading files is not allowed"),
    ("SELECT * FROM read_text('/etc/hostname')", "reading files is not allowed"),
    ("ATTACH '/tmp/x.db' AS x", "ATTACH"),
    ("SELECT 1; DROP TABLE decisions", "multiple statements"),
])
def test_sql_that_writes_or_reads_files_is_refused(running: Setup, sql: str, why: str) -> None:
    browser = viewer(running)
    for path in ("/sql?q=", "/sql/download?format=csv&q=", "/sql/download?format=parquet&q="):
        from urllib.parse import quote

        status, text = browser.get(path + quote(sql))
        assert why in html.unescape(text), text[:2000]
        assert status in (200, 400)
    assert not Path("/tmp/console-sql-test.csv").exists()


@pytest.mark.parametrize("directory", [
    "../../../etc", "/etc", "v2/../../active/../../..", "\x00", "", "v2/../../../passwd",
])
def test_trial_directory_outside_the_roots_is_refused(running: Setup, directory: str) -> None:
    browser = operator(running)
    token = browser.csrf()
    for action in ("run", "diff"):
        status, text = browser.post(f"/trials/{action}", {"directory": directory}, csrf=token)
        assert status == 400
        assert "error" in text and ("outside" in text or "name a schema set" in text or "not a schema set" in text), text
        assert "trial-result" not in text and "diff-result" not in text


def test_trial_symlink_out_of_a_root_is_refused(running: Setup, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside).mkdir()
    (outside / "manifest.yaml").write_text("version: x\n")
    link = running.candidates / "sneaky"
    link.symlink_to(outside)
    try:
        browser = operator(running)
        status, text = browser.post("/trials/diff", {"directory": "sneaky"}, csrf=browser.csrf())
        assert status == 400 and "outside the directories allowed" in text
    finally:
        link.unlink()


def test_markup_in_topics_client_ids_and_payloads_is_inert(running: Setup, rejected: dict[str, object]) -> None:
    browser = operator(running)
    pages = [browser.get(f"/messages/{rejected['id']}")[1], browser.get("/quarantine")[1],
             browser.get("/sql?q=" + "SELECT+topic,client_id,payload::VARCHAR+AS+p+FROM+decisions")[1]]
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page
    # Shown as text: the page holds it escaped, and a browser displays exactly it.
    assert f"evil{EVIL}" in html.unescape(pages[0])  # the client id
    assert EVIL in html.unescape(pages[0])  # the payload's field (and the reason quoting it)
    assert f"evil{EVIL}" in html.unescape(pages[1])
    assert f"events/{EVIL}" in html.unescape(pages[2])  # the topic
    # The live tail carries it as JSON text; the page's script puts it in with textContent.
    status, headers, _ = browser.request("GET", "/verdicts")
    assert status == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    script = (Path(__file__).resolve().parents[2] / "appliance/console/static/console.js").read_text()
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write", script)


def test_markup_in_a_connected_client_id_is_inert_on_the_clients_page(running: Setup) -> None:
    client = Client(running.mqtt_port, client_id=f"c{EVIL}").connect()
    try:
        status, page = operator(running).get("/clients")
        assert status == 200
        assert "<script>alert" not in page
        assert re.search(r"c&lt;script&gt;alert\(", page)
    finally:
        client.disconnect()


def test_a_loopback_console_answers_only_to_loopback_names(running: Setup) -> None:
    browser = Browser(running.console_port)
    for host in ("127.0.0.1", "localhost", f"localhost:{running.console_port}", f"127.0.0.1:{running.console_port}"):
        assert browser.request("GET", "/login", headers={"Host": host})[0] == 200
    for host in ("evil.example", f"evil.example:{running.console_port}", "127.0.0.1.evil.example"):
        assert browser.request("GET", "/login", headers={"Host": host})[0] == 421


def test_console_refuses_an_unsafe_bind(tmp_path: Path) -> None:
    setup = write_setup(tmp_path)
    cases = [
        (["--listen", "0.0.0.0:18080"], "set console.tls"),
    ]
    for extra, message in cases:
        done = subprocess.run([sys.executable, "-m", "appliance", "console", "--config", str(setup.config), *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and message in done.stderr, done.stderr
    config = json.loads(setup.config.read_text())
    config["console"] = {"listen": "0.0.0.0:18080", "tls": {"cert_file": "c.pem", "key_file": "k.pem"}}
    setup.config.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "appliance", "console", "--config", str(setup.config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "list at least one user" in done.stderr, done.stderr
    config["console"] = {"operators": ["olga"]}
    del config["auth"]
    setup.config.write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "appliance", "console", "--config", str(setup.config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "auth.password_file is not set" in done.stderr, done.stderr


def test_admin_socket_answers_the_clients_operation(running: Setup) -> None:
    client = Client(running.mqtt_port, client_id="listed-client").connect()
    try:
        clients = admin.call(running.state_dir, "clients")["clients"]
        assert [c for c in clients if c["client_id"] == "listed-client"][0]["protocol"] == 4
    finally:
        client.disconnect()
