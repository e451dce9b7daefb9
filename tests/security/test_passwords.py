"""Password files: compatible with the real mosquitto_passwd both ways; the CLI that manages them."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from appliance.security import Authenticator, AuthResult, PasswordFile, PasswordFileError, hash_password
from appliance.security.passwords import verify_password

needs_tool = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")


@needs_tool
@pytest.mark.parametrize("algorithm", ["sha512-pbkdf2", "sha512"])
def test_files_written_by_mosquitto_passwd_verify(tmp_path, algorithm):
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-H", algorithm, "-b", "-c", str(path), "alice", "s3cret: ü"], check=True)
    subprocess.run(["mosquitto_passwd", "-H", algorithm, "-b", str(path), "bob", "other"], check=True)
    passwords = PasswordFile.load(path)
    assert passwords.entries["alice"].startswith("$7$101$" if algorithm == "sha512-pbkdf2" else "$6$")
    assert passwords.verify("alice", "s3cret: ü".encode())
    assert passwords.verify("bob", b"other")
    assert not passwords.verify("alice", b"other")
    assert not passwords.verify("carol", b"other")


@needs_tool
def test_mosquitto_accepts_our_hashes(tmp_path):
    """What we write, mosquitto_passwd reads and keeps (it rewrites only the user it changes)."""
    path = tmp_path / "passwd"
    passwords = PasswordFile(path=path)
    passwords.set("alice", "pw-a")
    passwords.save()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "bob", "pw-b"], check=True)
    reloaded = PasswordFile.load(path)
    assert reloaded.verify("alice", b"pw-a") and reloaded.verify("bob", b"pw-b")


def test_hash_format_matches_mosquitto_2_0():
    encoded = hash_password("x", salt=b"\0" * 12)
    _, seven, iterations, salt, digest = encoded.split("$")
    assert (seven, iterations, salt, len(digest)) == ("7", "101", "AAAAAAAAAAAAAAAA", 88)
    assert verify_password(encoded, b"x") and not verify_password(encoded, b"y")


def test_broken_lines_name_file_and_line(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"alice:{hash_password('a')}\nbob:plaintext\n")
    with pytest.raises(PasswordFileError, match=r"passwd:2: user 'bob'"):
        PasswordFile.load(path)
    path.write_text("alice:$7$999999999$AAAA$AAAA\n")
    with pytest.raises(PasswordFileError, match="iterations"):
        PasswordFile.load(path)


def test_saved_file_is_private(tmp_path):
    passwords = PasswordFile(path=tmp_path / "passwd")
    passwords.set("a", "b")
    passwords.save()
    assert (tmp_path / "passwd").stat().st_mode & 0o777 == 0o600


def test_authenticator_decisions():
    passwords = PasswordFile()
    passwords.set("alice", "pw")
    strict = Authenticator(passwords, allow_anonymous=False)
    assert strict.authenticate("alice", b"pw") is AuthResult.OK
    assert strict.authenticate("alice", b"pw") is AuthResult.OK  # from the cache
    assert strict.authenticate("alice", b"nope") is AuthResult.BAD_CREDENTIALS
    assert strict.authenticate("mallory", b"pw") is AuthResult.BAD_CREDENTIALS
    assert strict.authenticate("alice", None) is AuthResult.BAD_CREDENTIALS
    assert strict.authenticate(None, None) is AuthResult.NOT_AUTHORIZED
    assert strict.authenticate(None, None, identity="sensor-1") is AuthResult.OK
    assert Authenticator(passwords, allow_anonymous=True).authenticate(None, None) is AuthResult.OK
    # No password file: usernames are just names, allowed only with anonymous access.
    assert Authenticator(None, allow_anonymous=True).authenticate("x", b"y") is AuthResult.OK
    assert Authenticator(None, allow_anonymous=False).authenticate("x", b"y") is AuthResult.NOT_AUTHORIZED


def test_cache_follows_a_changed_password():
    passwords = PasswordFile()
    passwords.set("alice", "old")
    auth = Authenticator(passwords)
    assert auth.authenticate("alice", b"old") is AuthResult.OK
    passwords.set("alice", "new")
    assert auth.authenticate("alice", b"old") is AuthResult.BAD_CREDENTIALS
    assert auth.authenticate("alice", b"new") is AuthResult.OK


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_passwd_command(tmp_path):
    path = tmp_path / "passwd"
    assert _cli("passwd", str(path), "alice", "--password-stdin", stdin="pw-a\n").returncode == 0
    assert _cli("passwd", str(path), "bob", "--password-stdin", stdin="pw-b\n").returncode == 0
    assert PasswordFile.load(path).verify("alice", b"pw-a")
    assert _cli("passwd", str(path), "--delete", "alice").returncode == 0
    assert list(PasswordFile.load(path).entries) == ["bob"]
    result = _cli("passwd", str(path), "--delete", "alice")
    assert result.returncode == 1 and "no user 'alice'" in result.stderr
    if shutil.which("mosquitto_passwd"):
        # mosquitto's own tool reads the file we wrote without complaint.
        subprocess.run(["mosquitto_passwd", "-b", str(path), "carol", "pw-c"], check=True)
        assert PasswordFile.load(path).verify("bob", b"pw-b")


def test_short_digests_are_refused(tmp_path):
    # A 1-byte digest would match one password in 256.
    path = tmp_path / "passwd"
    path.write_text("alice:$7$101$AAAAAAAAAAAAAAAA$AA==\n")
    with pytest.raises(PasswordFileError, match="not 64"):
        PasswordFile.load(path)
