"""The SMTP AUTH user database: SASLprep, Argon2id hashes and the ``users`` file.

Real files and real Argon2id (RFC 9106 parameters: about 0.2 s per hash or
verification), so each test hashes as little as it can: most share one
hash made per module.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ehlo.auth import UserError, UserStore, check_password, hash_password, saslprep
from ehlo.auth import users as users_module

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def phc() -> str:
    """One real hash of PASSWORD, shared by the tests that only need a valid line."""
    return hash_password(PASSWORD)


def write_users(data: Path, text: str) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    path = data / "users"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# SASLprep (RFC 4013 section 3 examples)


@pytest.mark.parametrize(
    ("given", "prepared"),
    [
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space mapped to SPACE
        ("\u0627\u0031\u0628", "\u0627\u0031\u0628"),  # RandALCat first and last
    ],
)
def test_saslprep_maps_and_normalizes(given: str, prepared: str) -> None:
    assert saslprep(given) == prepared


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("\u0007", "prohibited character U+0007"),
        ("pass\u200eword", "prohibited character U+200E"),  # C.8 change display
        ("\ue000", "prohibited character U+E000"),  # C.3 private use
        ("\u0627\u0031", "right-to-left"),  # bidi: must end with RandALCat
        ("\u0627a\u0628", "mixes right-to-left and left-to-right"),
        ("\u0221", "unassigned code point U+0221"),  # unassigned in Unicode 3.2
    ],
)
def test_saslprep_refuses(given: str, error: str) -> None:
    with pytest.raises(UserError, match=re.escape(error)):
        saslprep(given)


def test_saslprep_query_allows_unassigned() -> None:
    assert saslprep("\u0221", query=True) == "\u0221"
    with pytest.raises(UserError):
        saslprep("\u0007", query=True)


# --------------------------------------------------------------------------
# Hashing


def test_hash_has_rfc9106_parameters(phc: str) -> None:
    match = re.fullmatch(r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$([^$]+)\$([^$]+)", phc)
    assert match is not None, phc
    assert match.group(1, 2, 3) == ("65536", "3", "4")
    unb64 = base64.b64decode
    assert len(unb64(match.group(4) + "==")) == 16  # salt
    assert len(unb64(match.group(5) + "==")) == 32  # tag


def test_hash_round_trip_and_wrong_password(phc: str) -> None:
    assert check_password(phc, PASSWORD)
    assert not check_password(phc, PASSWORD + "!")


def test_check_password_applies_saslprep() -> None:
    stored = hash_password("I\u00adX\u00a0\u2168")
    assert check_password(stored, "IX IX")
    assert not check_password(stored, "\u0007")  # fails SASLprep: just does not verify


def test_check_password_reads_parameters_from_the_hash() -> None:
    old = Argon2id(salt=b"0123456789abcdef", length=32, iterations=1, lanes=4, memory_cost=32)
    encoded = old.derive_phc_encoded(b"old secret")
    assert "m=32,t=1,p=4" in encoded
    assert check_password(encoded, "old secret")
    assert not check_password(encoded, "new secret")


# Written by earlier versions of ehlo (cryptography's Argon2id, RFC 9106 parameters) for "pw".
OLD_PHC = (
    "$argon2id$v=19$m=65536,t=3,p=4$Ln5Hbmu09bvekigVgeUzoA"
    "$kUIO1wLaXYAmP94AiW2eQ3RGibLpK9BFdvoGlFysz/Q"
)


def test_hash_written_by_earlier_versions_verifies(tmp_path: Path) -> None:
    assert check_password(OLD_PHC, "pw")
    assert not check_password(OLD_PHC, "pw2")
    write_users(tmp_path, f"alice:{OLD_PHC}\n")
    assert UserStore(tmp_path).verify("alice", "pw")


def test_new_hashes_are_standard_phc_strings() -> None:
    # Read back by another Argon2id implementation (the one earlier versions wrote with).
    stored = hash_password("s\u00e9cret")
    Argon2id.verify_phc_encoded("s\u00e9cret".encode(), stored)


def test_concurrent_verifications_all_finish() -> None:
    # Several threads verifying the same p=4 hash at once: every one answers.
    results: list[bool] = []
    lock = threading.Lock()

    def verify(password: str) -> None:
        ok = check_password(OLD_PHC, password)
        with lock:
            results.append(ok)

    threads = [
        threading.Thread(target=verify, args=("pw" if i % 2 else "wrong",), daemon=True)
        for i in range(6)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert sorted(results) == [False] * 3 + [True] * 3


@pytest.mark.parametrize(
    "bad",
    ["", "garbage", "$argon2i$v=19$m=32,t=1,p=4$AAAAAAAAAAAAAAAAAAAAAA$AAAA", "$argon2id$v=19$m"],
)
def test_check_password_malformed_hash_is_false(bad: str) -> None:
    assert check_password(bad, PASSWORD) is False


@pytest.mark.parametrize(
    ("password", "error"),
    [("", "empty password"), ("\u00ad", "empty password"), ("a\u0007", "prohibited")],
)
def test_hash_password_refuses(password: str, error: str) -> None:
    with pytest.raises(UserError, match=error):
        hash_password(password)


# --------------------------------------------------------------------------
# The users file


def test_add_replace_remove_list(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    store = UserStore(data)
    assert store.path == data / "users"
    assert store.names() == [] and len(store) == 0  # no folder, no file: no users

    assert store.add("bob", "hunter2") is True
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert store.add("alice@example.org", "first") is True
    assert store.names() == ["alice@example.org", "bob"]
    assert len(store) == 2
    assert store.add("alice@example.org", "second") is False  # replaced

    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    # Atomic rewrites leave nothing behind but the file and the lock file.
    assert sorted(p.name for p in data.iterdir()) == [".users.lock", "users"]
    lines = [ln for ln in store.path.read_text().splitlines() if not ln.startswith("#")]
    assert [ln.split(":", 1)[0] for ln in lines] == ["bob", "alice@example.org"]

    assert store.verify("alice@example.org", "second")
    assert not store.verify("alice@example.org", "first")
    assert not store.verify("Alice@example.org", "second")  # names are case-sensitive

    assert store.remove("bob") is True
    assert store.remove("bob") is False
    assert store.names() == ["alice@example.org"]
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_remove_keeps_comments_and_unknown_lines(tmp_path: Path, phc: str) -> None:
    text = f"# admins\nalice:{phc}\nnot a user line\n\nbob:{phc}\n"
    path = write_users(tmp_path, text)
    store = UserStore(tmp_path)
    assert store.remove("alice")
    assert path.read_text() == f"# admins\nnot a user line\n\nbob:{phc}\n"


@pytest.mark.parametrize(
    "name", ["", "a" * 65, "al ice", "alice:x", "al\u00efce", "alice\n", "a/b"]
)
def test_invalid_names_refused(tmp_path: Path, name: str) -> None:
    store = UserStore(tmp_path)
    with pytest.raises(UserError, match="invalid user name"):
        store.add(name, PASSWORD)
    with pytest.raises(UserError, match="invalid user name"):
        store.remove(name)
    assert not store.path.exists()


def test_valid_name_characters(tmp_path: Path, phc: str) -> None:
    name = "A.z_0@9+x-" + "n" * 54
    assert len(name) == 64
    write_users(tmp_path, f"{name}:{phc}\n")
    assert UserStore(tmp_path).names() == [name]


@pytest.mark.parametrize(
    ("password", "error"),
    [("", "empty password"), ("x" * 256, "longer than 255 octets"), ("\u0627\u0031", "right")],
)
def test_add_refuses_bad_passwords(tmp_path: Path, password: str, error: str) -> None:
    store = UserStore(tmp_path)
    with pytest.raises(UserError, match=error):
        store.add("alice", password)
    assert store.names() == []


def test_malformed_lines_are_skipped(
    tmp_path: Path, phc: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_users(
        tmp_path,
        "# a comment\n"
        "   \n"
        f"alice:{phc}\r\n"
        "no colon here\n"
        f"bad name:{phc}\n"
        "carol:plaintext-password\n"
        f"dave:{phc.replace('argon2id', 'argon2i')}\n"
        f"alice:{phc}x\n",  # a second entry: the first one counts
    )
    store = UserStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ehlo.auth"):
        assert store.names() == ["alice"]
    warned = [r.getMessage() for r in caplog.records if r.name == "ehlo.auth"]
    assert [int(re.search(r"line (\d+)", m).group(1)) for m in warned] == [4, 5, 6, 7, 8]  # type: ignore[union-attr]
    assert all(phc not in m for m in warned)
    assert store.verify("alice", PASSWORD)
    assert not store.verify("carol", "plaintext-password")


def test_refresh_sees_changes_by_another_instance(tmp_path: Path, phc: str) -> None:
    server = UserStore(tmp_path)
    admin = UserStore(tmp_path)
    assert len(server) == 0
    write_users(tmp_path, f"alice:{phc}\n")
    assert server.names() == ["alice"]
    assert admin.add("bob", "bobs password") is True
    assert server.names() == ["alice", "bob"]
    assert admin.remove("alice")
    assert len(server) == 1
    assert "alice" not in server and "bob" in server
    store_path = tmp_path / "users"
    store_path.unlink()
    assert server.names() == []


def test_refresh_only_stats_when_unchanged(
    tmp_path: Path, phc: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_users(tmp_path, f"alice:{phc}\n")
    store = UserStore(tmp_path)
    store.refresh()
    parses: list[Path] = []
    real_parse = users_module._parse

    def counting_parse(text: str, path: Path) -> dict[str, str]:
        parses.append(path)
        return real_parse(text, path)

    monkeypatch.setattr(users_module, "_parse", counting_parse)
    for _ in range(3):
        store.refresh()
    assert parses == []
    os.utime(store.path, ns=(time.time_ns(), time.time_ns() + 10**9))
    store.refresh()
    assert parses == [store.path]


def test_unknown_user_runs_one_dummy_verification(
    tmp_path: Path, phc: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_users(tmp_path, f"alice:{phc}\n")
    store = UserStore(tmp_path)
    calls: list[tuple[str, str]] = []

    def counting(stored: str, password: str) -> bool:
        calls.append((stored, password))
        return True  # even a "match" against the dummy hash must not log anyone in

    dummy = "$argon2id$v=19$m=65536,t=3,p=4$ZHVtbXlkdW1teWR1bW15$ZHVtbXk"
    monkeypatch.setattr(users_module, "_dummy_phc", dummy)
    monkeypatch.setattr(users_module, "check_password", counting)
    assert store.verify("mallory", "guess") is False
    assert store.verify("bad name!", "guess") is False
    assert calls == [(dummy, "guess"), (dummy, "guess")]
    calls.clear()
    assert store.verify("alice", "guess") is True
    assert calls == [(phc, "guess")]


def test_unknown_user_real_verification(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    assert store.verify("nobody", PASSWORD) is False
    assert users_module._dummy_phc is not None
    assert users_module._dummy_phc.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_unreadable_file_never_raises_at_login(
    tmp_path: Path, phc: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_users(tmp_path, f"alice:{phc}\n")
    store = UserStore(tmp_path)
    assert store.verify("alice", PASSWORD)
    # The file turns into something that cannot be read: keep what was read before.
    (tmp_path / "users").unlink()
    (tmp_path / "users").mkdir()
    with pytest.raises(UserError, match="cannot read"):
        store.refresh()
    with pytest.raises(UserError, match="cannot read"):
        store.names()
    monkeypatch.setattr(users_module, "check_password", lambda stored, password: stored == phc)
    with caplog.at_level(logging.WARNING, logger="ehlo.auth"):
        assert store.verify("alice", PASSWORD)
        assert len(store) == 1
    assert any("cannot read" in r.getMessage() for r in caplog.records)
    assert not UserStore(tmp_path).verify("alice", PASSWORD)


def test_data_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    store = UserStore(tmp_path / "data")
    with pytest.raises(UserError, match="cannot create data folder"):
        store.add("alice", PASSWORD)


def test_writers_take_turns_on_the_lock(tmp_path: Path) -> None:
    store = UserStore(tmp_path)
    tmp_path.joinpath(".users.lock").touch()
    results: list[bool] = []
    with open(tmp_path / ".users.lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        writer = threading.Thread(target=lambda: results.append(store.add("alice", "pw")))
        writer.start()
        writer.join(1.0)  # the hash is done by now; the write waits for the lock
        assert writer.is_alive()
        assert not store.path.exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    writer.join(10)
    assert results == [True]
    assert UserStore(tmp_path).names() == ["alice"]
