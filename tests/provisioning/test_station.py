"""The bench station against virtual devices over real pty pairs and sockets."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hardware import DeviceClient, FaultConfig, VirtualDevice
from hardware.errors import PortError
from provisioning.errors import InvalidIdentityError, ProvisioningError
from provisioning.pki import PKI
from provisioning.station import (
    ProvisionResult,
    StationError,
    StationSettings,
    device_id_from_template,
    provision,
    provision_many,
)
from provisioning.tls import client_context_for_credentials, server_context_for_pki
from tests.conftest import CLI, Result, assert_one_line_error, openssl_verify
from tests.provisioning.test_tls import handshake

FAST = StationSettings(timeout=0.15, retries=8, reconnects=3, reconnect_delay=0.2)


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Callable[..., VirtualDevice]]:
    """``devices(name, link="pty", **kwargs)`` starts a virtual device; all stop at the end."""
    started: list[VirtualDevice] = []

    def start(name: str, link: str = "pty", **kwargs: object) -> VirtualDevice:
        device = VirtualDevice(tmp_path / "stores" / name, link, **kwargs).start()  # type: ignore[arg-type]
        started.append(device)
        return device

    yield start
    for device in started:
        device.stop()


def _assert_credentials_work(pki: PKI, store: Path) -> None:
    """What a device holds after provisioning: openssl accepts it, a TLS handshake succeeds."""
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "ca.crt",
        "chain.crt",
        "device.crt",
        "device.key",
        "identity.json",
    ]
    assert stat.S_IMODE((store / "device.key").stat().st_mode) == 0o600
    assert openssl_verify(pki.path, store / "device.crt").returncode == 0
    outcome = handshake(server_context_for_pki(pki.path), client_context_for_credentials(store))
    assert outcome.server_error is None
    assert outcome.client_error is None


@pytest.mark.parametrize("can_genkey", [True, False], ids=["device-key", "injected-key"])
def test_full_flow_over_a_pty(
    pki: PKI, devices: Callable[..., VirtualDevice], tmp_path: Path, can_genkey: bool
) -> None:
    device = devices("unit", "pty", hardware_serial="SN-0042", can_genkey=can_genkey)
    result = provision(pki, device.address, broker="broker.test:8883", settings=FAST)

    assert result.ok
    assert result.device_id == "dev-sn-0042"
    assert result.key_mode == ("device" if can_genkey else "station")
    store = tmp_path / "stores" / "unit"
    _assert_credentials_work(pki, store)
    identity = json.loads((store / "identity.json").read_text())
    assert identity["device_id"] == "dev-sn-0042"
    assert identity["broker"] == "broker.test:8883"
    assert (store / ".locked").read_text().strip() == "dev-sn-0042"

    record = pki.registry.active("dev-sn-0042")
    assert record is not None
    assert record.hardware_serial == "SN-0042"
    assert record.key_origin == ("csr" if can_genkey else "station")
    line = [e for _, e in pki.ledger.entries()][-1]
    assert line.event == "issue"
    assert line.data["hardware_serial"] == "SN-0042"
    assert set(line.data["object_sha256"]) >= {"cert", "chain", "ca", "identity"}
    assert {"hello", "upload", "commit", "verify", "lock"} <= set(line.data["timings"])
    assert pki.verify_ledger().warnings == []


def test_station_never_holds_a_device_generated_key(
    pki: PKI, devices: Callable[..., VirtualDevice], tmp_path: Path
) -> None:
    device = devices("unit", "pty")
    provision(pki, device.address, settings=FAST)
    key = (tmp_path / "stores" / "unit" / "device.key").read_bytes()
    found = subprocess.run(
        ["grep", "-rlF", key.splitlines()[1].decode(), str(pki.path)],
        capture_output=True,
        check=False,
    )
    assert found.stdout == b"", "the device's private key turned up on the station"


def test_socket_link_and_explicit_id(
    pki: PKI, devices: Callable[..., VirtualDevice], tmp_path: Path
) -> None:
    device = devices("unit", "socket://127.0.0.1:0")
    result = provision(pki, device.address, device_id="pump-7", settings=FAST)
    assert result.device_id == "pump-7"
    _assert_credentials_work(pki, tmp_path / "stores" / "unit")


def test_locked_device_refuses_and_reset_is_explicit_and_logged(
    pki: PKI, pki_dir: Path, devices: Callable[..., VirtualDevice], tmp_path: Path
) -> None:
    device = devices("unit", "socket://127.0.0.1:0", hardware_serial="SN-1")
    first = provision(pki, device.address, settings=FAST)
    with pytest.raises(StationError, match=r"is locked as dev-sn-1.*iotauth hw reset"):
        provision(pki, device.address, settings=FAST)
    reset = subprocess.run(
        [*CLI, "hw", "reset", "--pki", str(pki_dir), "--port", device.address, "--yes"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    assert "revoked dev-sn-1" in reset.stdout
    old = pki.registry.history("dev-sn-1")[0]
    assert old.serial == first.cert_serial
    assert old.status == "revoked"
    events = [e.event for _, e in pki.ledger.entries()]
    assert events[-2:] == ["revoke", "factory-reset"]
    again = provision(pki, device.address, settings=FAST)
    assert again.ok
    assert again.cert_serial != first.cert_serial


def test_device_that_cannot_make_keys(pki: PKI, devices: Callable[..., VirtualDevice]) -> None:
    device = devices("unit", "pty", can_genkey=False)
    with pytest.raises(StationError, match="cannot generate keys; use --keygen station"):
        provision(pki, device.address, keygen="device", settings=FAST)
    assert pki.registry.count() == 0
    assert provision(pki, device.address, keygen="auto", settings=FAST).key_mode == "station"


def test_station_key_mode_on_a_capable_device(
    pki: PKI, devices: Callable[..., VirtualDevice], tmp_path: Path
) -> None:
    device = devices("unit", "pty")
    result = provision(pki, device.address, keygen="station", settings=FAST)
    assert result.key_mode == "station"
    _assert_credentials_work(pki, tmp_path / "stores" / "unit")


def test_no_device_answering(pki: PKI, tmp_path: Path) -> None:
    """A port with nothing behind it: a clear error, nothing recorded."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = listener.getsockname()[1]
    try:
        with pytest.raises(StationError, match="no device answering"):
            provision(
                pki, f"socket://127.0.0.1:{port}", settings=StationSettings(timeout=0.05, retries=2)
            )
    finally:
        listener.close()
    assert pki.registry.count() == 0


def test_two_stations_on_one_port(pki: PKI, devices: Callable[..., VirtualDevice]) -> None:
    device = devices("unit", "pty")
    with DeviceClient.open(device.address), pytest.raises(StationError, match=r"busy|in use|lock"):
        provision(pki, device.address, settings=FAST)
    with DeviceClient.open(device.address), pytest.raises(PortError):
        DeviceClient.open(device.address)


def test_cable_pulled_mid_upload_resumes_without_resending(
    pki: PKI, devices: Callable[..., VirtualDevice], tmp_path: Path
) -> None:
    """The device vanishes halfway through the upload and comes back on the same port."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    url = f"socket://127.0.0.1:{port}"
    store = tmp_path / "stores" / "unit"
    state: dict[str, VirtualDevice] = {
        "device": VirtualDevice(store, url, hardware_serial="SN-9").start()
    }
    pulled = threading.Event()

    def pull_cable(_port: str, phase: str, done: int, total: int) -> None:
        if phase == "upload" and done > total // 2 and not pulled.is_set():
            pulled.set()
            state["device"].stop()  # the cable comes out...

            def plug_back() -> None:
                time.sleep(0.3)  # ...and goes back in: the same unit, the same store
                state["device"] = VirtualDevice(store, url, hardware_serial="SN-9").start()

            threading.Thread(target=plug_back).start()

    try:
        result = provision(pki, url, settings=FAST, progress=pull_cable)
    finally:
        time.sleep(0.4)
        state["device"].stop()
    assert pulled.is_set()
    assert result.ok
    assert result.resumed
    line = [e for _, e in pki.ledger.entries()][-1]
    assert line.data["resumed"] is True
    _assert_credentials_work(pki, store)


def test_a_different_unit_after_reconnect_is_refused(pki: PKI, tmp_path: Path) -> None:
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()
    url = f"socket://127.0.0.1:{port}"
    state = {"device": VirtualDevice(tmp_path / "a", url, hardware_serial="SN-A").start()}

    def swap(_port: str, phase: str, done: int, total: int) -> None:
        if phase == "upload" and done and "swapped" not in state:
            state["swapped"] = state["device"]
            state["device"].stop()
            state["device"] = VirtualDevice(tmp_path / "b", url, hardware_serial="SN-B").start()

    try:
        with pytest.raises(
            StationError, match="wrong device on the port: expected SN-A, found SN-B"
        ):
            provision(pki, url, settings=FAST, progress=swap)
    finally:
        state["device"].stop()
    # The certificate may have reached SN-A: it is on the CRL, and no active device exists.
    assert pki.registry.active("dev-sn-a") is None
    assert [r.status for r in pki.registry.history("dev-sn-a")] == ["revoked"]


def test_device_gone_for_good_leaves_no_active_record(
    pki: PKI, devices: Callable[..., VirtualDevice]
) -> None:
    device = devices("unit", "socket://127.0.0.1:0")

    def vanish(_port: str, phase: str, done: int, total: int) -> None:
        if phase == "upload" and done:
            device.stop()

    with pytest.raises(StationError, match=r"stopped answering|link lost|cannot open"):
        provision(pki, device.address, settings=FAST, progress=vanish)
    assert pki.registry.active("dev-" + device.hardware_serial.lower()) is None
    assert pki.verify_ledger().warnings == []


def test_a_device_slower_than_the_station_thinks_names_the_options(
    pki: PKI, devices: Callable[..., VirtualDevice]
) -> None:
    """The unit runs at 1200 baud, the station believes 115200 and never retransmits: HELLO
    (0.4 s on that wire) gets through, a chunk of the CSR (2 s) does not, and the reason says
    which options to look at."""
    device = devices("slow", "socket://127.0.0.1:0", baudrate=1200)
    settings = StationSettings(baudrate=115200, timeout=1.0, retries=0, reconnects=0)
    with pytest.raises(StationError) as caught:
        provision(pki, device.address, settings=settings)
    reason = caught.value.reason
    assert "stopped answering" in reason, reason
    assert "raise --timeout (now 1 s)" in reason
    assert "--baud" in reason
    assert pki.registry.active("dev-" + device.hardware_serial.lower()) is None


@pytest.mark.slow
def test_noisy_link_provisions_devices_in_a_row(pki: PKI, tmp_path: Path) -> None:
    """0.1 % per-byte faults (flips, drops, garbage) and a boot log: every unit ends verified."""
    noise = 0.001 / 3
    for n in range(12):
        faults = FaultConfig(
            seed=n, flip_rate=noise, drop_rate=noise, garbage_rate=noise, boot_log=True
        )
        with VirtualDevice(
            tmp_path / f"d{n}", "socket://127.0.0.1:0", faults=faults, can_genkey=n % 2 == 0
        ) as device:
            result = provision(pki, device.address, settings=FAST)
        assert result.ok, result
        assert openssl_verify(pki.path, tmp_path / f"d{n}" / "device.crt").returncode == 0
    assert pki.registry.count() == 12
    assert pki.verify_ledger().entries == 13


def test_gang_mode_isolates_a_failing_port(
    pki: PKI, pki_dir: Path, devices: Callable[..., VirtualDevice]
) -> None:
    good = [devices(f"u{n}", "socket://127.0.0.1:0" if n % 2 else "pty") for n in range(4)]
    ports = [d.address for d in good]
    ports.insert(2, "socket://127.0.0.1:9")  # nothing listens there
    results = provision_many(pki_dir, ports, settings=FAST)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert "cannot open" in str(results[2].reason)
    assert len({r.device_id for r in results if r.ok}) == 4
    assert pki.registry.count() == 4
    assert pki.verify_ledger().entries == 5


def test_gang_mode_refuses_one_id_for_many_ports(pki_dir: Path, pki: PKI) -> None:
    with pytest.raises(ProvisioningError, match="--id-template"):
        provision_many(pki_dir, ["loop://", "loop://x"], device_id="dev-1")


@pytest.mark.parametrize(
    ("template", "serial", "expected"),
    [
        ("dev-{serial}", "EMU-1A2B", "dev-emu-1a2b"),
        ("{serial}", "AA:BB:CC:DD", "aa-bb-cc-dd"),
        ("sensor-{serial}", "__x__", "sensor-x"),
        ("{serial}", "-lead", "lead"),
    ],
)
def test_ids_from_templates(template: str, serial: str, expected: str) -> None:
    assert device_id_from_template(template, serial) == expected


@pytest.mark.parametrize(
    ("template", "serial", "reason"),
    [
        ("dev-{mac}", "x", "unknown placeholder(s) {mac}"),
        ("DEV_{serial}", "EMU-E73DA874", "upper-case"),
        ("dev_{serial}", "EMU-E73DA874", "'_'"),
        ("{serial}/", "EMU-E73DA874", "'/'"),
        ("-{serial}", "x", "starts with '-'"),
        ("dev-{serial", "x", "expected '}'"),
        ("dev-{serial:>9}", "x", "without ':'"),
        ("dev", "x", "no {serial}"),
        ("{serial}", "!!!", "no letters or digits"),
        ("dev-{serial}", "X" * 61, "65 characters long; the limit is 64"),
    ],
)
def test_bad_templates_are_refused_not_rewritten(template: str, serial: str, reason: str) -> None:
    """What the user wrote is the id, or a reason why not: never a silently different id."""
    with pytest.raises(InvalidIdentityError) as caught:
        device_id_from_template(template, serial)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [("DEV_{serial}", "upper-case"), ("{serial}/", "'/'"), ("dev-{mac}", "{mac}")],
)
def test_cli_checks_the_template_before_opening_a_port(
    pki_dir: Path, pki: PKI, template: str, fragment: str
) -> None:
    """The port named here cannot be opened: the template error must come first, on one line."""
    args = ["--pki", str(pki_dir), "--port", "/nonexistent/tty", "--id-template", template]
    proc = subprocess.run(
        [*CLI, "provision", *args], capture_output=True, text=True, check=False, timeout=60
    )
    assert_one_line_error(
        Result(proc.returncode, proc.stdout, proc.stderr), "--id-template", fragment
    )
    assert "nonexistent" not in proc.stderr
    with pytest.raises(InvalidIdentityError):  # the library refuses before its threads start
        provision_many(pki_dir, ["/nonexistent/tty"], id_template=template)


def test_cli_gang_mode_with_real_emulator_processes(
    pki_dir: Path, pki: PKI, tmp_path: Path
) -> None:
    """`iotauth hw emulate` in two processes, `iotauth provision` over both: the user's view."""
    procs = []
    addresses = []
    try:
        noisy = ["--no-keygen", "--noise", "0.001", "--boot-log"]
        for name, extra in (("a", []), ("b", noisy)):
            link = ["--link", "socket://127.0.0.1:0"]
            proc = subprocess.Popen(
                [*CLI, "hw", "emulate", "--store", str(tmp_path / name), *link, *extra],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("station port: "):
                    addresses.append(line.split(": ", 1)[1].strip())
                    break
        args = [*CLI, "provision", "--pki", str(pki_dir)]
        for address in addresses:
            args += ["--port", address]
        done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "2/2 provisioned" in done.stdout
        failed = subprocess.run(
            [*CLI, "provision", "--pki", str(pki_dir), "--port", addresses[0], "--port", "socket://127.0.0.1:9"],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert failed.returncode == 1
        assert "0/2 provisioned" in failed.stdout
        assert "is locked" in failed.stderr
        assert "Traceback" not in failed.stderr
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    for name in ("a", "b"):
        assert openssl_verify(pki_dir, tmp_path / name / "device.crt").returncode == 0


def test_ctrl_c_in_gang_mode_keeps_what_is_done_and_says_how_to_resume(
    pki_dir: Path, pki: PKI, devices: Callable[..., VirtualDevice]
) -> None:
    """SIGINT while one unit is done and another is still uploading at 2400 baud: exit 130 with
    one line naming what was kept and the port to rerun; the rerun finishes the second unit."""
    fast = devices("fast", "socket://127.0.0.1:0")
    slow = devices("slow", "socket://127.0.0.1:0", baudrate=2400)
    fast_id = "dev-" + fast.hardware_serial.lower()
    slow_id = "dev-" + slow.hardware_serial.lower()
    proc = subprocess.Popen(
        [*CLI, "provision", "--pki", str(pki_dir), "--port", fast.address, "--port", slow.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while pki.registry.active(fast_id) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pki.registry.active(fast_id) is not None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: kept 1 provisioned and recorded device(s)"), err
    assert fast_id in last
    assert f"rerun with --port {slow.address} to resume" in last
    assert "error:" not in err  # the stopped port is not reported as a failure
    assert "stopped" in out
    assert pki.registry.active(slow_id) is None
    assert pki.verify_ledger().warnings == []
    slow.byte_time = 0.0  # the rerun need not crawl
    rerun = subprocess.run(
        [*CLI, "provision", "--pki", str(pki_dir), "--port", slow.address],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert pki.registry.active(slow_id) is not None


def test_station_commands_speak_json(pki_dir: Path, pki: PKI, tmp_path: Path) -> None:
    """`hw emulate --json` prints one JSON line with the port as soon as it listens; `provision
    --json` gives one entry per port; `hw reset --json` names what it revoked."""
    emulator = subprocess.Popen(
        [*CLI, "hw", "emulate", "--store", str(tmp_path / "unit"), "--link",
         "socket://127.0.0.1:0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert emulator.stdout is not None
        ready = json.loads(emulator.stdout.readline())
        assert ready["event"] == "listening"
        port = ready["port"]
        assert port.startswith("socket://127.0.0.1:")
        device_id = "dev-" + ready["hardware_serial"].lower()
        done = subprocess.run(
            [*CLI, "provision", "--pki", str(pki_dir), "--port", port, "--port",
             "socket://127.0.0.1:9", "--json", "--timeout", "0.1"],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1  # one port has nothing behind it
        doc = json.loads(done.stdout)
        assert (doc["ok"], doc["provisioned"], doc["interrupted"]) == (False, 1, False)
        first, second = doc["results"]
        assert (first["port"], first["ok"], first["device_id"]) == (port, True, device_id)
        assert first["serial"] == pki.registry.active(device_id).serial  # type: ignore[union-attr]
        assert first["error"] is None
        assert (second["ok"], second["port"]) == (False, "socket://127.0.0.1:9")
        assert second["error"]
        reset = subprocess.run(
            [*CLI, "hw", "reset", "--pki", str(pki_dir), "--port", port, "--yes", "--json"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert reset.returncode == 0, reset.stderr
        wiped = json.loads(reset.stdout)
        assert (wiped["device_id"], wiped["revoked"]) == (device_id, [first["serial"]])
        assert wiped["hardware_serial"] == ready["hardware_serial"]
    finally:
        emulator.terminate()
        emulator.wait(10)


def test_cli_errors_are_one_line(pki_dir: Path, pki: PKI) -> None:
    bad_id = subprocess.run(
        [*CLI, "provision", "--pki", str(pki_dir), "--port", "loop://", "--device-id", "Bad/Id"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_one_line_error(
        Result(bad_id.returncode, bad_id.stdout, bad_id.stderr), "invalid device id"
    )
    bad_mode = subprocess.run(
        [*CLI, "provision", "--pki", str(pki_dir), "--port", "loop://", "--keygen", "magic"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert_one_line_error(Result(bad_mode.returncode, bad_mode.stdout, bad_mode.stderr), "--keygen")


def test_result_type_is_frozen() -> None:
    result = ProvisionResult(port="x", ok=False)
    with pytest.raises(AttributeError):
        result.ok = True  # type: ignore[misc]
