"""``ehlo users add|remove|list``: messages, exit codes, and where the password comes from."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from ehlo.auth import UserStore, hash_password
from ehlo.auth.cli import add_users_command, run_users

EHLO = Path(sys.executable).with_name("ehlo")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(argv: list[str]) -> int:
    """``ehlo users ...`` through a parser with just that command."""
    parser = _Parser(prog="ehlo")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_users_command(commands)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    result: int = args.func(args)
    return result


def stdin_bytes(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def error_line(stderr: str) -> str:
    """The one ``ehlo: error:`` line; no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("ehlo")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="module")
def phc() -> str:
    return hash_password("pw")


def test_add_from_stdin_then_change(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_bytes(monkeypatch, "s\u00e9cret\r\nignored\n".encode())
    assert run(["users", "add", "alice", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "user alice added\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("changed\n"))
    assert run(["users", "add", "alice", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "password of alice changed\n"
    store = UserStore(data)
    assert store.names() == ["alice"]
    assert store.verify("alice", "changed")


def test_password_is_never_an_argument(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert run(["users", "add", "alice", "s3cret", "--data", str(data)]) == 2
    assert "unrecognized arguments: s3cret" in error_line(capsys.readouterr().err)
    assert run(["users", "add", "alice", "--password", "s3cret", "--data", str(data)]) == 2
    assert not data.exists()


@pytest.mark.parametrize(
    ("stdin", "error"),
    [
        ("\n", "empty password"),
        ("", "empty password"),
        ("a\u0007b\n", "password contains a prohibited character U+0007"),
    ],
)
def test_add_refused_password(
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: str,
    error: str,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert run(["users", "add", "alice", "--data", str(data)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert error_line(err).startswith(f"ehlo: error: {error}")
    assert UserStore(data).names() == []


def test_add_stdin_not_utf8(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin_bytes(monkeypatch, b"\xff\xfe\n")
    assert run(["users", "add", "alice", "--data", str(data)]) == 1
    assert error_line(capsys.readouterr().err) == "ehlo: error: the password on stdin is not UTF-8"


def test_add_invalid_name_before_the_password(
    data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_prompt(prompt: str = "") -> str:
        raise AssertionError("asked for a password")

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", no_prompt)
    assert run(["users", "add", "al ice", "--data", str(data)]) == 1
    assert "invalid user name 'al ice'" in error_line(capsys.readouterr().err)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A terminal on stdin: getpass answers with the listed passwords in turn."""
    answers: list[str] = []
    prompts: list[str] = []

    def getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        if not answers:
            raise EOFError
        return answers.pop(0)

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", getpass)
    yield answers
    assert all("alice" in p or "Repeat" in p for p in prompts)


def test_add_from_terminal(
    data: Path, terminal: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    terminal.extend(["one", "two"])
    assert run(["users", "add", "alice", "--data", str(data)]) == 1
    assert error_line(capsys.readouterr().err) == "ehlo: error: the passwords do not match"
    assert not data.exists()
    assert run(["users", "add", "alice", "--data", str(data)]) == 1  # end of input
    assert error_line(capsys.readouterr().err) == "ehlo: error: no password given"
    terminal.extend(["tty pass", "tty pass"])
    assert run(["users", "add", "alice", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "user alice added\n"
    assert UserStore(data).verify("alice", "tty pass")


def test_remove(data: Path, phc: str, capsys: pytest.CaptureFixture[str]) -> None:
    data.mkdir()
    (data / "users").write_text(f"alice:{phc}\nbob:{phc}\n")
    assert run(["users", "remove", "bob", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "user bob removed\n"
    assert run(["users", "remove", "bob", "--data", str(data)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert error_line(err).startswith("ehlo: error: no user named bob")
    assert UserStore(data).names() == ["alice"]


def test_list(data: Path, phc: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["users", "list", "--data", str(data)]) == 0
    assert capsys.readouterr().out.startswith("no users")
    assert run(["users", "list", "--json", "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    data.mkdir()
    (data / "users").write_text(f"# comment\nzoe:{phc}\nalice:{phc}\n")
    assert run(["users", "list", "--data", str(data)]) == 0
    assert capsys.readouterr().out == "alice\nzoe\n"
    assert run(["users", "list", "--json", "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out) == ["alice", "zoe"]


def test_default_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(["users", "remove", "alice"]) == 1
    assert "ehlo-data" in error_line(capsys.readouterr().err)


def test_unusable_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "users").mkdir()  # a folder where the file should be
    assert run(["users", "list", "--data", str(tmp_path / "d")]) == 1
    assert error_line(capsys.readouterr().err).startswith("ehlo: error: cannot read ")
    assert run(["users", "remove", "x", "--data", str(tmp_path / "d")]) == 1
    assert error_line(capsys.readouterr().err).startswith("ehlo: error: cannot read ")
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\n"))
    assert run(["users", "add", "alice", "--data", str(tmp_path / "file")]) == 1
    assert "cannot create data folder" in error_line(capsys.readouterr().err)


def test_no_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_users(argparse.Namespace(action=None)) == 2
    assert run(["users"]) == 2
    err = capsys.readouterr().err
    assert "choose an action: add, remove, list" in err and "Traceback" not in err


def _child(argv: list[str], stdin: bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}  # stdin is read as bytes anyway
    return subprocess.run(
        argv, input=stdin, capture_output=True, cwd=cwd, env=env, timeout=60, check=False
    )


def test_add_from_a_pipe_in_a_child_process(tmp_path: Path) -> None:
    script = (
        "import argparse, sys; from ehlo.auth.cli import add_users_command;"
        "p = argparse.ArgumentParser(prog='ehlo'); add_users_command(p.add_subparsers());"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
    )
    argv = [sys.executable, "-c", script, "users", "add", "j\u00f6rg", "--data", "d"]
    done = _child(argv, "\u00fcber geheim\n".encode(), tmp_path)
    assert done.returncode == 1  # not a valid name: nothing read, nothing written
    assert done.stderr.startswith(b"ehlo: error: invalid user name")
    argv[-3] = "jorg"
    done = _child(argv, "\u00fcber geheim\n".encode(), tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"user jorg added\n", b"")
    assert UserStore(tmp_path / "d").verify("jorg", "\u00fcber geheim")


def test_console_script(tmp_path: Path) -> None:
    # The installed entry point (the venv's scripts folder), never skipped:
    # losing the command or the script must fail here.
    assert EHLO.is_file(), f"no ehlo console script next to {sys.executable}"
    done = subprocess.run([str(EHLO), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "users" in done.stdout, done.stdout + done.stderr
    ehlo = str(EHLO)
    done = _child([ehlo, "users", "add", "alice", "--data", "d"], b"pw one\n", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"user alice added\n", b"")
    done = _child([ehlo, "users", "add", "alice", "pw", "--data", "d"], b"", tmp_path)
    assert done.returncode == 2 and b"unrecognized arguments: pw" in done.stderr
    done = _child([ehlo, "users", "list", "--json", "--data", "d"], b"", tmp_path)
    assert (done.returncode, json.loads(done.stdout)) == (0, ["alice"])
    done = _child([ehlo, "users", "remove", "bob", "--data", "d"], b"", tmp_path)
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert done.stderr.decode().splitlines()[-1].startswith("ehlo: error: no user named bob")
    done = _child([ehlo, "users", "remove", "alice", "--data", "d"], b"", tmp_path)
    assert (done.returncode, done.stdout) == (0, b"user alice removed\n")
    assert UserStore(tmp_path / "d").names() == []
