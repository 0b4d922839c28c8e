"""A fleet backend on this machine: the real PKI plus our broker in-process, or mosquitto.

``device_agent`` may not import the PKI or the broker, so the simulator takes this object from
outside. It is used by ``bench/fleet.py`` and the device-agent tests; the composition root
(``iotauth fleet simulate``) registers the same class (see docs/AGENT.md).
Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from broker import BrokerSettings
from broker.export import ExportResult, export, load_inventory
from broker.policy import Policy, default_policy
from broker.renewal import RenewalSettings
from broker.server import BrokerThread
from device_agent.errors import AgentError
from provisioning.config import PKIConfig
from provisioning.errors import PKINotFoundError
from provisioning.export_hook import publish_crl
from provisioning.identity import IdentityKind
from provisioning.pki import PKI, passphrase_from_env

__all__ = [
    "ExportedMosquittoBackend",
    "LocalFleetBackend",
    "Mosquitto",
    "OurBrokerProcess",
    "free_port",
    "simulation_backend",
]

MONITOR = "fleet-monitor"  # the service identity the fleet simulator watches the fleet as


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminate(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    """Stop a broker process: the signal, a grace period, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _await_listening(
    proc: subprocess.Popen[bytes],
    port: int,
    what: str,
    *,
    timeout: float = 10.0,
    ready: Callable[[], bool] = lambda: True,
    why: Callable[[], str] = lambda: "",
) -> None:
    """Wait until ``port`` accepts (and ``ready()``); AgentError if the process exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            detail = why()
            raise AgentError(f"{what} exited{': ' + detail if detail else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if ready():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AgentError(f"{what} did not start listening")


def _issue_devices(
    pki: PKI, names: Sequence[str], out_root: Path, *, expired: bool, supersede: bool = True
) -> list[Path]:
    """Fresh credential directories for ``names``, 500 per batch.

    ``supersede``: an active name is re-issued (the old certificate revoked as superseded);
    otherwise it is refused (DeviceExistsError) before anything is issued.
    """
    if not supersede:
        _refuse_active(pki, names)
    out_root.mkdir(parents=True, exist_ok=True)
    dirs = [out_root / n for n in names]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=3) if expired else None
    days = 1 if expired else None
    for start in range(0, len(names), 500):
        chunk = list(names[start : start + 500])
        pki.issue_many(
            chunk, out_dirs=dirs[start : start + 500], rotate=supersede, now=now, days=days
        )
    return dirs


def _refuse_active(pki: PKI, names: Sequence[str]) -> None:
    taken = [n for n in names if pki.registry.active(n) is not None]
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        msg = (
            f"{', '.join(taken[:3])}{more} already active in {pki.path}: the simulation would "
            "supersede them; revoke them first or simulate without --into-pki"
        )
        raise AgentError(msg)


def _issue_monitor(pki: PKI, out_root: Path, *, supersede: bool = True) -> Path:
    """The fleet monitor's service credentials (re-issued on every run if ``supersede``)."""
    out = out_root / MONITOR
    shutil.rmtree(out, ignore_errors=True)
    if not supersede:
        _refuse_active(pki, [MONITOR])
    pki.issue(MONITOR, kind=IdentityKind.SERVICE, out=out, rotate=supersede)
    return out


class Mosquitto:
    """mosquitto with mTLS: identity = certificate CN, an ACL per identity (ARCHITECTURE.md)."""

    def __init__(
        self,
        pki_dir: Path,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        services: Sequence[str] = (MONITOR, "sink"),
    ) -> None:
        self.pki_dir = pki_dir
        self.workdir = workdir
        self.port = port or free_port()
        self.persistence = persistence
        self.services = services
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        acl = self.workdir / "acl"
        lines = ["pattern readwrite devices/%u/#", ""]
        for name in self.services:
            lines += [
                f"user {name}",
                "topic read devices/+/telemetry/#",
                "topic read devices/+/state",
                "topic read devices/+/replies/#",
                "topic write devices/+/commands/#",
                "",
            ]
        acl.write_text("\n".join(lines))
        conf = self.workdir / "mosquitto.conf"
        user = os.environ.get("USER") or "root"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    f"cafile {self.pki_dir / 'root.crt'}",
                    f"certfile {self.pki_dir / 'server.crt'}",
                    f"keyfile {self.pki_dir / 'private' / 'server.key'}",
                    f"crlfile {self.pki_dir / 'crl.pem'}",
                    "require_certificate true",
                    "use_identity_as_username true",
                    f"acl_file {acl}",
                    "set_tcp_nodelay true",
                    "max_queued_messages 100000",
                    "max_inflight_messages 100",
                    f"persistence {'true' if self.persistence else 'false'}",
                    f"persistence_location {self.workdir}/",
                    "log_type error",
                    f"user {user}",
                    "",
                ]
            )
        )
        return conf

    def start(self) -> Mosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        proc = self.proc
        stderr = proc.stderr

        def why() -> str:
            return stderr.read().decode().strip() if stderr else ""

        _await_listening(proc, self.port, "mosquitto", why=why)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _terminate(self.proc, sig)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class OurBrokerProcess:
    """``iotauth broker run`` as its own process (benchmarks: the agents get this process)."""

    def __init__(self, pki_dir: Path, *, port: int | None = None) -> None:
        self.pki_dir = pki_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OurBrokerProcess:
        cmd = [
            sys.executable,
            "-m",
            "iotauth",
            "broker",
            "run",
            "--pki",
            str(self.pki_dir),
            "--port",
            str(self.port),
            # In memory, as the Mosquitto it is compared with runs by default (a scratch PKI:
            # there is nothing to keep across runs).
            "--no-persist",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _await_listening(self.proc, self.port, "iotauth broker run", timeout=30)
        return self

    def stop(self) -> None:
        _terminate(self.proc, grace=15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class LocalFleetBackend:
    """A PKI and a broker on 127.0.0.1: ours in-process, or mosquitto.

    Tests and benchmarks hand it a PKI of their own, so by default it supersedes names it
    finds active. ``supersede=False`` (a user's PKI, ``fleet simulate --into-pki``) refuses
    them instead and revokes, on :meth:`close`, everything it issued: the simulated devices'
    keys live only in a temporary directory.
    """

    def __init__(
        self,
        pki_dir: Path,
        *,
        broker: str | None = None,
        kind: str = "ours",
        workdir: Path | None = None,
        renewal: bool = True,
        supersede: bool = True,
        passphrase: bytes | None = None,
    ) -> None:
        self.pki = PKI.open(pki_dir, passphrase=passphrase)
        self.supersede = supersede
        self.issued: list[tuple[str, IdentityKind]] = []
        self.kind = kind
        self._external = broker
        self._thread: BrokerThread | None = None
        self._mosquitto: Mosquitto | OurBrokerProcess | None = None
        self._renewal = renewal
        if broker is None and kind == "ours":
            self._thread = self._start_ours(0)
        elif broker is None and kind == "ours-process":
            self._mosquitto = OurBrokerProcess(pki_dir).start()
        elif broker is None and kind == "mosquitto":
            self._mosquitto = Mosquitto(pki_dir, (workdir or pki_dir.parent) / "mosquitto").start()

    def _start_ours(self, port: int) -> BrokerThread:
        settings = BrokerSettings(
            self.pki.path,
            port=port,
            renewal=RenewalSettings() if self._renewal else None,
        )
        thread = BrokerThread(settings, audit_sink=lambda _line: None).start()
        if thread.broker.renewal is not None:
            thread.broker.renewal.wait_subscribed()
        return thread

    @property
    def broker(self) -> str:
        if self._thread is not None:
            return f"127.0.0.1:{self._thread.port}"
        if self._mosquitto is not None:
            return self._mosquitto.address
        if self._external is None:
            msg = "the fleet backend has no broker"
            raise AgentError(msg)
        return self._external

    @property
    def broker_thread(self) -> BrokerThread | None:
        return self._thread

    def issue(self, names: Sequence[str], out_root: Path, *, expired: bool = False) -> list[Path]:
        dirs = _issue_devices(self.pki, names, out_root, expired=expired, supersede=self.supersede)
        self.issued.extend((n, IdentityKind.DEVICE) for n in names)
        return dirs

    def issue_monitor(self, out_root: Path) -> Path:
        out = _issue_monitor(self.pki, out_root, supersede=self.supersede)
        self.issued.append((MONITOR, IdentityKind.SERVICE))
        return out

    def revoke(self, names: Sequence[str]) -> None:
        for name in names:
            self.pki.revoke(name, reason="key-compromise")
        if self._mosquitto is not None:
            self._mosquitto.restart()  # mosquitto reads its CRL at start only (ours: polls it)
        elif self._thread is not None:
            self._thread.call(self._thread.broker.check_revocations())

    def restart_broker(self) -> None:
        if self._thread is not None:
            port = self._thread.port
            self._thread.stop()
            self._thread = self._start_ours(port)
        elif self._mosquitto is not None:
            self._mosquitto.restart()
        else:
            raise AgentError("cannot restart a broker this process did not start")

    def close(self) -> None:
        try:
            if self._thread is not None:
                self._thread.stop()
            if self._mosquitto is not None:
                self._mosquitto.stop()
            if not self.supersede:
                self._retire_issued()
        finally:
            self.pki.close()

    def _retire_issued(self) -> None:
        """Revoke what this run issued into a PKI it does not own (its keys are gone)."""
        for name, kind in self.issued:
            if self.pki.registry.active(name) is not None:
                self.pki.revoke(name, reason="cessation-of-operation", kind=kind)


def simulation_backend(
    pki_dir: Path | None,
    broker: str | None,
    workdir: Path,
    *,
    into_pki: bool,
    names: Sequence[str],
    warn: Callable[[str], None],
) -> LocalFleetBackend:
    """The backend of ``iotauth fleet simulate``: a scratch PKI unless ``into_pki``.

    By default nothing of ``pki_dir`` is changed: the simulation gets a fresh PKI in ``workdir``
    with the same trust domain and lifetimes, and our broker in-process on it. (A copy of the
    user's issuing CA would let the broker they run accept the simulated devices, but every
    certificate it signed would be one the user's registry and ledger never saw.) A broker the
    user runs trusts only its own PKI, so ``--broker`` needs ``into_pki``. With ``into_pki`` the
    devices and the monitor are issued into ``pki_dir`` (after a warning; names already active
    are refused) and revoked when the backend closes.
    """
    if into_pki:
        if pki_dir is None:
            raise AgentError("--into-pki needs --pki DIR (or IOTAUTH_PKI)")
        with PKI.open(pki_dir) as pki:  # before our broker starts and issues 'renewal' there
            _refuse_active(pki, [*names, MONITOR])
        first, last = names[0], names[-1]
        warn(
            f"warning: issuing {len(names)} simulated devices ({first} .. {last}) and the service "
            f"{MONITOR} into {pki_dir}; they are revoked when the simulation ends"
            + ("" if broker else " (our broker in-process also issues 'renewal' if it is missing)")
        )
        return LocalFleetBackend(
            pki_dir, broker=broker, supersede=False, passphrase=passphrase_from_env()
        )
    if broker is not None:
        msg = (
            f"the broker at {broker} trusts its own PKI, not the simulation's scratch PKI: add "
            "--into-pki to issue the simulated devices into --pki (revoked at the end), or drop "
            "--broker to simulate against a broker of its own"
        )
        raise AgentError(msg)
    config = PKIConfig(trust_domain="fleet.example")
    if pki_dir is not None:
        if not (pki_dir / "pki.toml").is_file():
            raise PKINotFoundError(pki_dir)
        config = PKIConfig.load(pki_dir / "pki.toml")
    scratch = workdir / "scratch-pki"
    PKI.init(scratch, trust_domain=config.trust_domain, device_days=config.device_days).close()
    return LocalFleetBackend(scratch, workdir=workdir)


class ExportedMosquittoBackend:
    """The real PKI and mosquitto started from ``iotauth broker export`` (docs/EXPORT.md).

    Unlike :class:`Mosquitto`, nothing here writes a mosquitto configuration: the broker runs
    from the export directory as a user would run it (``mosquitto -c OUT/mosquitto.conf``).
    Revocations go through the same hook as ``iotauth device revoke --export OUT --reload``
    (CRL copied, SIGHUP, live sessions closed). A service issued here (the fleet monitor) gets
    its rights only from a new export, so :meth:`issue_monitor` re-exports and restarts.
    """

    def __init__(
        self,
        pki_dir: Path,
        workdir: Path,
        *,
        policy: Policy | None = None,
        port: int | None = None,
        kick: bool = True,
    ) -> None:
        self.pki = PKI.open(pki_dir)
        self.policy = policy or default_policy()
        self.port = port or free_port()
        self.kick = kick
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = (workdir / "mosquitto-export").resolve()
        self.log = workdir / "mosquitto-export.log"
        # AF_UNIX paths are short (108 bytes): the kick channel's socket lives in /tmp.
        self._short = Path(tempfile.mkdtemp(prefix="iam-", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.last_export: ExportResult | None = None
        try:
            self.export()
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def export(self) -> ExportResult:
        """(Re-)write the export directory from the PKI, as ``iotauth broker export`` does."""
        self.last_export = export(
            self.policy,
            load_inventory(self.pki.path),
            self.out,
            fmt="mosquitto",
            options={
                "host": "127.0.0.1",
                "port": self.port,
                # Mosquitto started as root drops to the user 'mosquitto' unless told otherwise.
                "run_as": pwd.getpwuid(os.geteuid()).pw_name,
                "kick": self.kick,
                "admin_socket": self._short / "admin.sock",
            },
        )
        return self.last_export

    def start(self) -> ExportedMosquittoBackend:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        pid_file = self.out / "mosquitto.pid"
        pid_file.unlink(missing_ok=True)
        with self.log.open("ab") as sink:  # a pipe nobody reads would stall mosquitto
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.out / "mosquitto.conf")], stdout=sink, stderr=sink
            )
        log = self.log

        def why() -> str:
            return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])

        try:
            _await_listening(
                self.proc, self.port, "mosquitto (exported configuration)",
                ready=pid_file.exists, why=why,
            )  # fmt: skip
        except AgentError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def issue(self, names: Sequence[str], out_root: Path, *, expired: bool = False) -> list[Path]:
        # Devices are served by the export's patterns: no re-export needed.
        return _issue_devices(self.pki, names, out_root, expired=expired)

    def issue_monitor(self, out_root: Path) -> Path:
        out = _issue_monitor(self.pki, out_root)
        # A service's rights (and its deny lines) are per-identity entries: re-export. The new
        # export also has a new kick-channel password, which the plugin reads at start only.
        self.export()
        self.restart_broker()
        return out

    def revoke(self, names: Sequence[str]) -> None:
        for name in names:
            self.pki.revoke(name, reason="key-compromise")
        running = self.proc is not None and self.proc.poll() is None
        publish_crl(self.out, self.pki, reload=running, names=list(names) if running else [])

    def restart_broker(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self.pki.close()
        shutil.rmtree(self._short, ignore_errors=True)
