"""The console's parts without a browser: payload display, cookbook, logins and roles, sessions,
the rate limiter, the trial directory check, the systemd unit, HTTPS."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Config, load_config
from appliance.console import cookbook
from appliance.console.auth import (
    ConsoleSetupError,
    LoginLimiter,
    Role,
    Sessions,
    Users,
    check_setup,
)
from appliance.console.payloads import show
from appliance.console.trials import TrialError, Trials
from appliance.security import PasswordFile
from tests.console.conftest import start_console, stop, write_setup
from tests.helpers import wait_until
from tests.tls import make_certificates

ROOT = Path(__file__).resolve().parents[2]


def test_reasons_sit_at_the_line_their_path_points_at() -> None:
    payload = json.dumps({"device_id": "d", "reading": {"values": [1, 2, "x"]}}).encode()
    reasons: list[dict[str, Any]] = [
        {"check": "schema", "message": "not a number", "path": "/reading/values/2"},
        {"check": "schema", "message": "'unit' is required", "path": "/reading/unit"},  # missing: at its object
        {"check": "rule", "message": "device mismatch", "path": None},
        {"check": "schema", "message": "root", "path": ""},
    ]
    shown = show(payload, None, reasons)
    assert shown.kind == "json"
    by_path = {line.path: line for line in shown.lines if line.reasons}
    assert [r["message"] for r in by_path["/reading/values/2"].reasons] == ["not a number"]
    assert '"x"' in by_path["/reading/values/2"].text
    assert [r["message"] for r in by_path["/reading"].reasons] == ["'unit' is required"]
    assert by_path["/reading"].text.startswith('"reading": {')
    assert [r["message"] for r in by_path[""].reasons] == ["root"]
    assert [r["message"] for r in shown.unplaced] == ["device mismatch"]


def test_a_rule_reason_sits_at_the_field_its_expression_reads() -> None:
    shown = show(json.dumps({"device_id": "a", "n": {"v": 1}}).encode(), None, [
        {"check": "rule", "message": "rule 'r' failed: payload.n.v > 2 && payload.device_id != ''", "path": None},
        {"check": "rule", "message": "rule 'q' failed: payload.missing == 1", "path": None},
    ])
    assert [(line.path, [r["message"][:8] for r in line.reasons]) for line in shown.lines if line.reasons] == [
        ("/n/v", ["rule 'r'"])]
    assert [r["message"][:8] for r in shown.unplaced] == ["rule 'q'"]


def test_keys_with_slashes_and_tildes_are_escaped_in_pointers() -> None:
    shown = show(json.dumps({"a/b": 1, "c~d": 2}).encode(), None,
                 [{"check": "schema", "message": "m", "path": "/a~1b"}, {"check": "schema", "message": "n", "path": "/c~0d"}])
    assert [line.path for line in shown.lines if line.reasons] == ["/a~1b", "/c~0d"]


def test_protobuf_payloads_are_decoded_with_the_topic_schema() -> None:
    from appliance.governance import load_schema_set
    from tests.governance.payloads import device_status

    schema_set = load_schema_set(ROOT / "schemas" / "v1")
    _allowed, mapping = schema_set.route("device/d1/status")
    assert mapping is not None
    shown = show(device_status("d1", battery_mv=3100), mapping.schema, [])
    assert shown.kind == "protobuf"
    text = "\n".join(line.text for line in shown.lines)
    assert '"deviceId": "d1"' in text or '"device_id": "d1"' in text


def test_binary_payloads_are_hex_and_text_is_text() -> None:
    assert show(bytes(range(20)), None, []).kind == "hex"
    assert show(bytes(range(20)), None, []).lines[0].text.startswith("00000000  00 01 02")
    assert show(b"plain words", None, []).kind == "text"
    assert show(None, None, []).kind == "purged"
    assert show(b"", None, []).kind == "empty"


def test_cookbook_holds_every_query_of_the_docs() -> None:
    text = (ROOT / "docs" / "audit.md").read_text()
    entries = cookbook.parse(text)
    assert [name for name, _, _ in entries] == [m for m in __import__("re").findall(r"<!-- cookbook: ([\w-]+) -->", text)]
    assert all(sql.upper().lstrip().startswith(("SELECT", "WITH")) for _, _, sql in entries)
    assert cookbook.queries() == entries


def test_cookbook_is_read_from_package_data_without_a_checkout_or_debian_docs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cookbook, "PLACES", (tmp_path / "docs" / "audit.md", tmp_path / "usr-share-doc" / "audit.md"))
    cookbook.queries.cache_clear()
    try:
        entries = cookbook.queries()  # as in a wheel install: only appliance/console/audit.md
    finally:
        cookbook.queries.cache_clear()
    assert entries and entries == cookbook.parse((ROOT / "docs" / "audit.md").read_text())


def test_the_packaged_cookbook_is_the_docs_file_itself() -> None:
    packaged = ROOT / "appliance" / "console" / cookbook.PACKAGED
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / "docs" / "audit.md").resolve()  # not a copy
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert cookbook.PACKAGED in package_data["appliance.console"]


def config_with(tmp_path: Path, **console: object) -> Config:
    values: dict[str, object] = {"state_dir": str(tmp_path / "state")}
    for key, value in console.items():
        values[f"console.{key}"] = value
    if console.get("operators") or console.get("viewers"):
        values["auth.password_file"] = str(tmp_path / "passwd")
    return load_config(None, values)


def _users(tmp_path: Path) -> None:
    passwords = PasswordFile()
    passwords.set("a", "pw")
    passwords.set("v", "pw")
    passwords.save(tmp_path / "passwd")


def setup_of(config: Config) -> bool:
    return check_setup(config, config.console)


def test_check_setup_refuses_unsafe_binds(tmp_path: Path) -> None:
    _users(tmp_path)
    assert setup_of(config_with(tmp_path)) is False  # loopback, no users: read-only without login
    assert setup_of(config_with(tmp_path, operators=["a"])) is True
    with pytest.raises(ConsoleSetupError, match="set console.tls"):
        setup_of(config_with(tmp_path, listen="0.0.0.0:8080", operators=["a"]))
    tls = {"cert_file": "c.pem", "key_file": "k.pem"}
    with pytest.raises(ConsoleSetupError, match="at least one user"):
        setup_of(config_with(tmp_path, listen="[::]:8080", tls=tls))
    assert setup_of(config_with(tmp_path, listen="192.0.2.1:8443", tls=tls, viewers=["v"])) is True
    with pytest.raises(ConsoleSetupError, match="password_file is not set"):
        setup_of(load_config(None, {"console.operators": ["a"]}))
    (tmp_path / "passwd").unlink()
    with pytest.raises(ConsoleSetupError, match="no such password file"):
        setup_of(config_with(tmp_path, operators=["a"]))


def test_a_user_in_both_lists_is_a_config_error(tmp_path: Path) -> None:
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match="both as operators and viewers"):
        config_with(tmp_path, operators=["a"], viewers=["a"])


@pytest.mark.parametrize("identity", ["cn", "san"])
def test_console_tls_refuses_use_identity_as_username(tmp_path: Path, identity: str) -> None:
    from appliance.config import ConfigError

    tls = {"cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem", "require_client_certificate": True}
    with pytest.raises(ConfigError, match=r"console\.tls\.use_identity_as_username is not supported: the console "
                       "authenticates with its password file"):
        config_with(tmp_path, tls={**tls, "use_identity_as_username": identity})
    config = config_with(tmp_path, tls={**tls, "use_identity_as_username": "none"})
    assert config.console.tls is not None and config.console.tls.require_client_certificate


def test_users_get_their_role_from_the_console_section(tmp_path: Path) -> None:
    passwords = PasswordFile()
    for user in ("op", "view", "other"):
        passwords.set(user, f"{user}-pw")
    passwords.save(tmp_path / "passwd")
    config = config_with(tmp_path, operators=["op"], viewers=["view"])
    users = Users(config.auth.password_file, config.console)
    assert users.authenticate("op", "op-pw") is Role.OPERATOR
    assert users.authenticate("view", "view-pw") is Role.VIEWER
    assert users.authenticate("other", "other-pw") is None  # in the file, not in the console section
    assert users.authenticate("op", "view-pw") is None
    passwords.delete("op")
    passwords.save(tmp_path / "passwd")
    assert users.authenticate("op", "op-pw") is None  # the file is read again: a removed user is out at once


def test_sessions_end_after_being_idle() -> None:
    now = [0.0]
    sessions = Sessions(60, clock=lambda: now[0])
    token, session = sessions.create("u", Role.VIEWER)
    now[0] = 59
    assert sessions.get(token) is session
    now[0] = 118  # 59 s after the last request
    assert sessions.get(token) is session
    now[0] = 179
    assert sessions.get(token) is None
    assert sessions.get("forged") is None and sessions.get(None) is None
    assert not session.csrf_ok(None) and not session.csrf_ok("x") and session.csrf_ok(session.csrf)


def test_expired_sessions_are_swept_at_login_and_at_lookups() -> None:
    now = [0.0]
    sessions = Sessions(600, clock=lambda: now[0])
    for user in ("gone-1", "gone-2", "gone-3"):  # users who never come back
        sessions.create(user, Role.VIEWER)
    now[0] = 601
    token, _ = sessions.create("back", Role.OPERATOR)  # a login sweeps
    assert len(sessions) == 1
    for user in ("gone-4", "gone-5"):
        sessions.create(user, Role.VIEWER)
    now[0] = 1202
    assert sessions.get(token) is None and len(sessions) == 0  # a lookup more than a minute after the last sweep
    token, session = sessions.create("active", Role.OPERATOR)
    sessions.create("gone-6", Role.VIEWER)
    now[0] = 1202 + 601
    assert sessions.get(None) is None and len(sessions) == 0  # even one without a cookie
    token, session = sessions.create("active", Role.OPERATOR)
    sessions.create("gone-7", Role.VIEWER)
    for _ in range(20):  # an active user keeps coming back: the others' sessions go once idle
        now[0] += 59
        assert sessions.get(token) is session
    assert len(sessions) == 1


def test_login_limiter_counts_per_user_and_per_address() -> None:
    now = [0.0]
    limiter = LoginLimiter(3, 60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.reserve("u", "10.0.0.1") is not None  # a wrong password: never taken back
    assert limiter.reserve("u", "10.0.0.2") is None  # the user name, from anywhere
    assert limiter.reserve("v", "10.0.0.1") is None  # the address, for any name
    assert limiter.allowed("v", "10.0.0.2")
    now[0] = 61
    assert limiter.allowed("u", "10.0.0.1")


def test_login_limiter_counts_attempts_still_being_checked_and_takes_back_right_ones() -> None:
    now = [0.0]
    limiter = LoginLimiter(3, 60, clock=lambda: now[0])
    pending = [limiter.reserve("u", "10.0.0.1") for _ in range(3)]  # three checks under way at once
    assert None not in pending
    assert limiter.reserve("u", "10.0.0.1") is None  # a fourth is refused before any of them ends
    stamp = pending[0]
    assert stamp is not None
    limiter.succeeded("u", "10.0.0.1", stamp)  # the first one was right: not a failure
    assert limiter.reserve("u", "10.0.0.1") is not None
    assert limiter.reserve("u", "10.0.0.1") is None


def test_trial_directories_must_stay_under_a_root(tmp_path: Path) -> None:
    root = tmp_path / "candidates"
    (root / "good").mkdir(parents=True)
    (root / "good" / "manifest.yaml").write_text("version: g\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "manifest.yaml").write_text("version: s\n")
    (root / "link").symlink_to(tmp_path / "secret")
    trials = Trials(load_config(None, {"state_dir": str(tmp_path / "state"), "console.trial_roots": [str(root)]}))
    assert trials.candidate("good") == (root / "good").resolve()
    assert trials.candidate(str(root / "good")) == (root / "good").resolve()
    for bad in ("../secret", str(tmp_path / "secret"), "link", "good/../../secret", "/", "", "a\x00b"):
        with pytest.raises(TrialError):
            trials.candidate(bad)
    with pytest.raises(TrialError, match="no manifest"):
        trials.candidate(".")
    nowhere = Trials(load_config(None, {"state_dir": str(tmp_path / "state")}))
    with pytest.raises(TrialError, match="console.trial_roots"):
        nowhere.candidate("good")


UNIT = ROOT / "systemd" / "mqtt-appliance-console.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_console_unit(tmp_path: Path) -> None:
    appliance = Path(sys.executable).parent / "appliance"
    text = UNIT.read_text()
    assert "/opt/mqtt-appliance/venv/bin/appliance console --config /etc/mqtt-appliance/appliance.yaml" in text
    (tmp_path / UNIT.name).write_text(text.replace("/opt/mqtt-appliance/venv/bin/appliance", str(appliance)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / UNIT.name)], check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "mqtt-appliance-console.service" not in result.stderr, result.stderr


def test_the_package_installs_the_console_unit() -> None:
    build = (ROOT / "packaging" / "build-deb.sh").read_text()
    assert "systemd/mqtt-appliance-console.service" in build


def test_console_over_https_sets_a_secure_cookie(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    setup = write_setup(tmp_path, tls={"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)})
    proc = start_console(setup)  # no appliance needed: the pages say it is unreachable
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        connection = http.client.HTTPSConnection("127.0.0.1", setup.console_port, context=context, timeout=30)
        body = "user=olga&password=operator-pw-1&next=/"
        connection.request("POST", "/login", body=body,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        response.read()
        assert response.status == 303
        cookie = response.getheader("set-cookie") or ""
        assert "Secure" in cookie and "HttpOnly" in cookie

        def overview() -> str:
            connection.request("GET", "/", headers={"Cookie": cookie.split(";")[0]})
            response = connection.getresponse()
            assert response.status == 200
            return response.read().decode()

        # No appliance runs on this state dir: the overview says so (and the console keeps serving).
        wait_until(lambda: 'data-field="service">unreachable<' in overview(), message="service unreachable")
        plain = http.client.HTTPConnection("127.0.0.1", setup.console_port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("GET", "/login")
            plain.getresponse().read()
    finally:
        stop(proc)


def test_trial_progress_is_read_from_the_replay_progress_bar(tmp_path: Path) -> None:
    import time

    from appliance.console.trials import TrialRun

    errors = tmp_path / "err"
    errors.write_bytes(b"\x1b[?25lreplaying          0/40,004 -:--:--\r\x1b[2Kreplaying \xe2\x94\x81\xe2\x94\x81  5,004/40,004 0:00:03")
    process = subprocess.Popen(["true"])
    process.wait()
    run = TrialRun("r", tmp_path, "u", time.time(), process, tmp_path / "missing.json", errors)
    assert run.progress() == (5004, 40004)
    assert not run.running
    assert run.report is None and run.problem is not None and "replaying" not in run.problem


def test_a_loopback_console_without_users_may_look_but_not_act(tmp_path: Path) -> None:
    from tests.console.conftest import Browser

    setup = write_setup(tmp_path, operators=[], viewers=[])
    proc = start_console(setup)
    try:
        browser = Browser(setup.console_port)
        status, page = browser.get("/")
        assert status == 200 and "local (viewer)" in page and "log out" not in page
        status, _ = browser.post("/quarantine/purge", {"id": "1"}, csrf=browser.csrf())
        assert status == 403
        assert "read-only without login" in setup.console_output()
    finally:
        stop(proc)


def test_appliance_check_reports_a_missing_console_certificate(tmp_path: Path) -> None:
    setup = write_setup(tmp_path, tls={"cert_file": str(tmp_path / "nope.pem"), "key_file": str(tmp_path / "nope.key")})
    done = subprocess.run([sys.executable, "-m", "appliance", "check", "--config", str(setup.config)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert f"console.tls.cert_file: {tmp_path / 'nope.pem'}: No such file or directory" in done.stderr, done.stderr


def test_a_borrowed_snapshot_stays_open_across_new_ones(tmp_path: Path) -> None:
    """A download reads its snapshot for as long as its client takes: a new snapshot taken meanwhile
    is a new one beside it (refreshing it would end the download's result), and the borrowed one
    is closed when given back; without a borrower a snapshot is refreshed in place."""
    import duckdb

    from appliance.console.store import Store
    from tests.audit.factory import decision, epoch
    from tests.audit.logfiles import build_state

    state = build_state(tmp_path / "state", [decision(i, epoch("2026-11-27T10:00:00") + i) for i in range(1, 6)])
    store = Store(state)
    with store.borrowed() as reading:
        cursor = reading.cursor()
        cursor.execute("SELECT id FROM decisions ORDER BY id")
        assert cursor.fetchmany(2) == [(1,), (2,)]
        store.invalidate()
        with store.cursor() as other:  # a page meanwhile: a fresh snapshot, not the borrowed one
            assert other.execute("SELECT count(*) FROM decisions").fetchall() == [(5,)]
        assert store._query is not reading
        assert cursor.fetchall() == [(3,), (4,), (5,)]  # the download's result went on
        cursor.close()
    with pytest.raises(duckdb.Error):
        reading.cursor()  # given back and no longer the store's: closed
    current = store._query
    store.invalidate()
    with store.cursor():
        assert store._query is current  # nobody borrowed it: refreshed in place
    store.close()


def test_a_parquet_download_that_cannot_stage_gives_its_snapshot_back(tmp_path: Path) -> None:
    """The staging directory cannot be made (the disk fails when the store makes it): the error
    goes to the caller and the snapshot the download borrowed is given back, not left open."""
    from appliance.console.download import open_download
    from appliance.console.store import Store
    from tests.audit.factory import decision, epoch
    from tests.audit.logfiles import build_state

    class FailingDisk(Store):
        def scratch_dir(self) -> Path:
            raise OSError(5, "Input/output error")

    state = build_state(tmp_path / "state", [decision(i, epoch("2026-11-27T10:00:00") + i) for i in range(1, 6)])
    store = FailingDisk(state)
    failed: OSError | None = None
    try:
        open_download(store, "SELECT id FROM decisions", "parquet", max_rows=10, timeout=30)
    except OSError as exc:
        failed = exc
    # Given back at once, not when the garbage collector happens to free the failed download (its
    # exception's traceback, kept here as a caller or a reference cycle may keep it, holds its frame).
    assert failed is not None and failed.__traceback__ is not None
    assert store._borrowed == {}
    store.close()
