"""`iotauth demo` as CI and a newcomer run it: from a clean state, in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from iotauth.demo import MARKER, WorkdirRefused, prepare_workdir
from provisioning.pki import PKI
from tests.conftest import CLI, Result, assert_one_line_error


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*CLI, "demo", "--devices", "3", "--workdir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, timeout=300,
    )  # fmt: skip
    out = proc.stdout  # stdout and stderr as one stream, in the order a terminal shows them
    assert proc.returncode == 0, out[-6000:]
    assert "steps passed" in out
    assert "Traceback" not in out
    assert _processes_mentioning(str(work)) == []
    # The commands it prints are the ones that would redo each step: the broker's real port.
    port = re.search(r"MQTT broker on 127\.0\.0\.1:(\d+)", out)
    assert port is not None, out
    assert f"$ iotauth broker run --pki {work / 'pki'} --port {port[1]}" in out
    assert f"--broker 127.0.0.1:{port[1]}" in out
    if port[1] != "8883":
        assert "--port 8883" not in out
        assert ":8883 " not in out
    # A result line never shares a line with a table's border (output is not a terminal here).
    assert not [line for line in out.splitlines() if "┘" in line and "✓" in line], out
    # Nothing (an agent's log line) after the summary but its rows and the closing hint, which
    # names the kept work directory.
    tail = out[out.index("steps passed") :].splitlines()[1:]
    assert tail[-2:] == [
        f"Work directory kept: {work}",
        f"Look around: iotauth ledger verify --pki {work / 'pki'}; "
        f"iotauth device list --pki {work / 'pki'} --all",
    ], tail
    assert all(line.startswith(("✓ ", " ")) for line in tail[:-2]), tail
    verify = subprocess.run(
        [*CLI, "ledger", "verify", "--pki", str(work / "pki")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


def test_a_broken_step_fails_clearly_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The broker's port is taken: the demo names the step, exits 1, and stops what it started."""
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    work = tmp_path / "demo"
    try:
        proc = subprocess.run(
            [*CLI, "demo", "--workdir", str(work), "--broker-port", str(port)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
    finally:
        blocker.close()
    assert proc.returncode == 1
    assert "demo failed at step 2 (start the broker)" in proc.stdout
    assert f"127.0.0.1:{port}" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _processes_mentioning(str(work)) == []


@pytest.mark.slow
def test_without_keep_the_closing_hint_does_not_point_into_the_removed_directory() -> None:
    proc = subprocess.run(
        [*CLI, "demo", "--devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    first = re.search(r"work directory (\S+)", proc.stdout)
    assert first is not None
    work = Path(first[1])
    assert not work.exists()
    last = proc.stdout.strip().splitlines()[-1]
    assert str(work) not in last, last
    assert "--keep" in last, last
    assert _processes_mentioning(str(work)) == []


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_workdir_that_is_not_the_demos_own_is_refused(
    pki: PKI, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    """--workdir at an existing PKI (or any non-empty directory): one line, nothing written."""
    before = _tree(pki.path)
    result = cli("demo", "--workdir", str(pki.path))
    assert_one_line_error(result, str(pki.path), "not empty")
    assert result.stdout == ""
    assert _tree(pki.path) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert_one_line_error(cli("demo", "--workdir", str(a_file)), "not a directory")
    assert a_file.read_text() == "mine"


def test_a_demos_own_workdir_is_emptied_and_reused(tmp_path: Path) -> None:
    fresh = prepare_workdir(tmp_path / "new")  # missing: created and marked
    assert (fresh / MARKER).is_file()
    (fresh / "pki").mkdir()
    (fresh / "pki" / "pki.toml").write_text("old")
    (fresh / "leftover").write_text("x")
    again = prepare_workdir(fresh)
    assert sorted(p.name for p in again.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (prepare_workdir(empty) / MARKER).is_file()
    temporary = prepare_workdir(None)
    try:
        assert temporary.name.startswith("iotauth-demo-")
    finally:
        shutil.rmtree(temporary)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "data").write_text("keep me")
    with pytest.raises(WorkdirRefused, match="not empty"):
        prepare_workdir(tmp_path / "theirs")
    assert (tmp_path / "theirs" / "data").read_text() == "keep me"
