"""The agent's footprint: RSS and CPU of a real `agent run` process, idle, publishing 1/s, renewed.

    .venv/bin/python bench/agent_footprint.py [--seconds 30] [--entry iotauth-agent|iotauth]
                                              [--keystore file|tpm] [--auth mtls|jwt]

Starts our broker (with its renewal service) in-process on 127.0.0.1:0, issues one device, runs
the agent as its own process and reads /proc/<pid>/{status,stat}. By default the agent is started
as the systemd unit starts it (packaging/iotauth-agent.service): the slim console script
`iotauth-agent run`, the one next to this Python. `--entry iotauth` measures `iotauth agent run`
(the full command line) instead, for comparison. The last line is the RSS after one renewal over
MQTT (the `renew` command): key and CSR made by a short-lived child process, the certificate
checked and installed with the stdlib ssl module, so the agent never loads cryptography.
Targets (issue 5): RSS <= 35 MB, idle CPU <= 0.5 %. `--keystore tpm` gives the device a key made
in a software TPM (swtpm, started here) by provisioning it over a pty from a TPM-backed virtual
device: the agent then signs its handshakes in the TPM and renews into a new TPM key.
`--auth jwt` runs the broker with a jwt listener beside the mTLS one and the agent with
`--auth jwt --token-ttl 20`: each connection is made with a device token signed in a child
process, and the busy window includes a reconnect with a fresh token (at 80 % of 20 s); the
renewal line is not measured then.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker import BrokerSettings
from broker.renewal import RenewalSettings
from broker.server import BrokerThread
from broker.settings import ListenerSpec
from hardware.emulator import VirtualDevice
from hardware.keygen import TpmBackend
from hardware.tpm import TCTI_ENV
from iotauth.testing import SoftTpm
from provisioning.identity import IdentityKind
from provisioning.pki import PKI
from provisioning.station import provision
from provisioning.tls import client_context_for_credentials

# Console scripts next to the interpreter, as `pip install iotauth[agent]` puts them in a venv.
BIN = Path(sys.executable).parent
ENTRIES = {
    "iotauth-agent": [str(BIN / "iotauth-agent")],
    "iotauth": [str(BIN / "iotauth"), "agent"],
}
DEVICE = "dev-bench"
TICK = os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


AUTH_ARGS: list[str] = []  # set by main() for --auth jwt


def _start(entry: list[str], store: Path, port: int, interval: float) -> subprocess.Popen[bytes]:
    argv = ["run", "--store", str(store), "--broker", f"127.0.0.1:{port}", *AUTH_ARGS]
    return subprocess.Popen(
        [*entry, *argv, "--telemetry-interval", str(interval)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def measure(
    entry: list[str], store: Path, port: int, interval: float, seconds: float
) -> dict[str, float]:
    proc = _start(entry, store, port, interval)
    try:
        time.sleep(5)  # start-up, imports, TLS handshake, first publish
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _cpu_s(proc.pid), time.monotonic()
        assert proc.poll() is None, f"the agent exited early ({proc.returncode})"
        return {"rss_mb": _rss_mb(proc.pid), "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0)}
    finally:
        proc.terminate()
        proc.wait(10)


def measure_renewal(entry: list[str], store: Path, service: Path, port: int) -> float:
    """RSS a few seconds after one renewal has been installed."""
    proc = _start(entry, store, port, 3600)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench")
    client.tls_set_context(client_context_for_credentials(service))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        time.sleep(5)
        before = (store / "device.crt").read_bytes()
        info = client.publish(f"devices/{DEVICE}/commands/renew", b"{}", qos=1)
        info.wait_for_publish(10)
        deadline = time.monotonic() + 60
        while (store / "device.crt").read_bytes() == before or (store / ".renewal").exists():
            assert time.monotonic() < deadline, "the renewal did not complete"
            assert proc.poll() is None, f"the agent exited early ({proc.returncode})"
            time.sleep(0.2)
        time.sleep(3)
        return _rss_mb(proc.pid)
    finally:
        client.disconnect()
        client.loop_stop()
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--entry", choices=sorted(ENTRIES), default="iotauth-agent")
    parser.add_argument("--keystore", choices=("file", "tpm"), default="file")
    parser.add_argument("--auth", choices=("mtls", "jwt"), default="mtls")
    args = parser.parse_args()
    if args.auth == "jwt":
        AUTH_ARGS.extend(["--auth", "jwt", "--token-ttl", "20"])
    entry = ENTRIES[args.entry]
    if not Path(entry[0]).exists():
        parser.error(
            f"{entry[0]} is missing: install the project again (make, or pip install -e .)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = PKI.init(root / "pki", trust_domain="fleet.example")
        soft = None
        if args.keystore == "tpm":
            soft = SoftTpm(root / "swtpm").start()
            os.environ[TCTI_ENV] = soft.tcti  # the agent process inherits it
            with VirtualDevice(root / "dev", "pty", backend=TpmBackend(soft.tcti)) as device:
                assert provision(pki, device.address, device_id=DEVICE).ok
        else:
            pki.issue(DEVICE, out=root / "dev")
        pki.issue("bench", kind=IdentityKind.SERVICE, out=root / "bench")
        listeners = (ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"jwt"})))
        if args.auth == "jwt":
            settings = BrokerSettings(root / "pki", renewal=RenewalSettings(), listeners=listeners)
        else:
            settings = BrokerSettings(root / "pki", renewal=RenewalSettings())
        renewed: float | None = None
        with BrokerThread(settings, audit_sink=lambda _: None) as broker:
            renewal = broker.broker.renewal
            assert renewal is not None
            assert renewal.wait_subscribed(), "the renewal service did not subscribe"
            port = list(broker.broker.ports.values())[-1] if args.auth == "jwt" else broker.port
            idle = measure(entry, root / "dev", port, 3600, args.seconds)
            busy = measure(entry, root / "dev", port, 1, args.seconds)
            if args.auth == "mtls":
                renewed = measure_renewal(entry, root / "dev", root / "bench", port)
        pki.close()
        if soft is not None:
            soft.stop()
    shown = " ".join([Path(entry[0]).name, *entry[1:]])
    print(f"entry point: {shown} run; device key: {args.keystore}; auth: {args.auth}")
    print(f"agent idle          RSS {idle['rss_mb']:.1f} MB, CPU {idle['cpu_percent']:.2f} %")
    print(f"agent 1 msg/s QoS1  RSS {busy['rss_mb']:.1f} MB, CPU {busy['cpu_percent']:.2f} %")
    if renewed is not None:
        print(f"after one renewal   RSS {renewed:.1f} MB")
    print(f"({args.seconds:.0f} s windows after 5 s start-up; python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
