"""`iotauth demo` as CI and a newcomer run it: from a clean state, in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI


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
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "steps passed" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert _processes_mentioning(str(work)) == []
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
