"""The agent's footprint: RSS and CPU of a real `agent run` process, idle and publishing 1/s.

    .venv/bin/python bench/agent_footprint.py [--seconds 30]

Starts our broker in-process on 127.0.0.1:0, issues one device, runs the agent as its own process
(the same entry point as `iotauth agent run`) and reads /proc/<pid>/{status,stat}. Targets
(issue 5): RSS <= 35 MB, idle CPU <= 0.5 %.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker import BrokerSettings
from broker.server import BrokerThread
from provisioning.pki import PKI

RUN = "from device_agent.cli import agent_app; agent_app()"
TICK = os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def measure(store: Path, port: int, interval: float, seconds: float) -> dict[str, float]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN,
            "run",
            "--store",
            str(store),
            "--broker",
            f"127.0.0.1:{port}",
            "--telemetry-interval",
            str(interval),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # start-up, imports, TLS handshake, first publish
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _cpu_s(proc.pid), time.monotonic()
        return {"rss_mb": _rss_mb(proc.pid), "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0)}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = PKI.init(root / "pki", trust_domain="fleet.example")
        pki.issue("dev-bench", out=root / "dev")
        with BrokerThread(BrokerSettings(root / "pki"), audit_sink=lambda _: None) as broker:
            idle = measure(root / "dev", broker.port, 3600, args.seconds)
            busy = measure(root / "dev", broker.port, 1, args.seconds)
        pki.close()
    print(f"agent idle          RSS {idle['rss_mb']:.1f} MB, CPU {idle['cpu_percent']:.2f} %")
    print(f"agent 1 msg/s QoS1  RSS {busy['rss_mb']:.1f} MB, CPU {busy['cpu_percent']:.2f} %")
    print(f"({args.seconds:.0f} s windows after 5 s start-up; python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
