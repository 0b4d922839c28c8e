"""Station client against the virtual device over real links: a pty pair and socket://.

Both sides run their real code; only the cable is virtual. Timeouts are tiny so the noisy and
broken-cable cases stay fast; nothing here asserts how long anything took.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hardware.client import DeviceClient
from hardware.codec import DeviceState, ObjectKind, Status
from hardware.emulator import FaultConfig, VirtualDevice, run_emulator
from hardware.errors import DeviceGoneError, DeviceRefusedError, PortError
from tests.hardware.hw_helpers import MiniCA, identity_json, make_key

LINKS = ["pty", "socket://127.0.0.1:0"]
DEVICE = "dev-0042"


def provision(client: DeviceClient, ca: MiniCA, *, inject: bool) -> dict[ObjectKind, bytes]:
    """The station's whole job for one unit; returns what it sent."""
    info = client.hello()
    assert info.can_genkey is not inject
    sent: dict[ObjectKind, bytes] = {}
    if inject:
        key_pem, public_key = make_key()
        client.put_object(ObjectKind.KEY, key_pem)
        sent[ObjectKind.KEY] = key_pem
    else:
        csr_pem = client.genkey(DEVICE)
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        assert csr.subject.rfc4514_string() == f"CN={DEVICE}"
        public_key = csr.public_key()
    sent[ObjectKind.CERT] = ca.issue(public_key, DEVICE)
    sent[ObjectKind.CHAIN] = ca.chain_pem
    sent[ObjectKind.CA] = ca.root_pem
    sent[ObjectKind.IDENTITY] = identity_json(DEVICE)
    for kind in (ObjectKind.CERT, ObjectKind.CHAIN, ObjectKind.CA, ObjectKind.IDENTITY):
        client.put_object(kind, sent[kind])
    committed = client.commit()
    assert ObjectKind.CERT in committed
    for kind, data in sent.items():
        assert client.verify(kind) == hashlib.sha256(data).hexdigest(), kind.name
    client.lock(DEVICE)
    return sent


def check_credential_directory(store: str, sent: dict[ObjectKind, bytes]) -> None:
    """What the device agent will read: complete, consistent, key private and matching."""
    names = sorted(n for n in os.listdir(store) if not n.startswith("."))
    assert names == ["ca.crt", "chain.crt", "device.crt", "device.key", "identity.json"]
    key_path = os.path.join(store, "device.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(store, "device.crt"), "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    assert [c.public_bytes(serialization.Encoding.PEM) for c in certs] == [
        sent[ObjectKind.CERT],
        sent[ObjectKind.CHAIN],
    ]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == certs[0].public_key().public_bytes(der, spki)
    with open(os.path.join(store, "identity.json"), "rb") as f:
        assert json.load(f)["device_id"] == DEVICE
    if ObjectKind.KEY in sent:
        with open(key_path, "rb") as f:
            assert f.read() == sent[ObjectKind.KEY]


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("inject", [False, True], ids=["genkey", "injected-key"])
def test_provision_over_real_link(tmp_path, mini_ca, link: str, inject: bool) -> None:
    store = str(tmp_path / "device")
    with (
        VirtualDevice(store, link, can_genkey=not inject) as device,
        DeviceClient.open(device.address, timeout=0.2) as client,
    ):
        sent = provision(client, mini_ca, inject=inject)
        info = client.hello()
        assert (info.state, info.device_id) == (DeviceState.LOCKED, DEVICE)
        with pytest.raises(DeviceRefusedError) as caught:
            client.put_object(ObjectKind.CA, mini_ca.chain_pem)
        assert caught.value.status == Status.LOCKED
        with pytest.raises(DeviceRefusedError) as caught:
            client.read(ObjectKind.KEY)
        assert caught.value.status == Status.FORBIDDEN
        assert client.read(ObjectKind.CA) == mini_ca.root_pem
        assert client.stats.retransmits.total() == 0
    check_credential_directory(store, sent)


@pytest.mark.parametrize("link", LINKS)
def test_noisy_link_still_completes(tmp_path, mini_ca, link: str) -> None:
    """Bit flips, dropped bytes, garbage and a boot log, in both directions."""
    faults = FaultConfig(
        seed=7, flip_rate=0.001, drop_rate=0.001, garbage_rate=0.001, boot_log=True
    )
    store = str(tmp_path / "device")
    with (
        VirtualDevice(store, link, faults=faults) as device,
        DeviceClient.open(
            device.address, timeout=0.05, retries=40, chunk_size=96, busy_interval=0.01
        ) as client,
    ):
        sent = provision(client, mini_ca, inject=False)
        hits = sum(device.inbound.counts.values()) + sum(device.outbound.counts.values())
        lost = device.responder.stats.decoder.dropped + client.stats.decoder.dropped
        assert hits > 0
        assert lost > 0
    check_credential_directory(store, sent)


def test_reboots_mid_session_still_complete(tmp_path, mini_ca) -> None:
    """Every fifth request the device reboots and loses its answer and all volatile state."""
    faults = FaultConfig(reboot_every=5, boot_log=True)
    store = str(tmp_path / "device")
    with (
        VirtualDevice(store, "socket://127.0.0.1:0", faults=faults) as device,
        DeviceClient.open(device.address, timeout=0.05, retries=10, chunk_size=200) as client,
    ):
        sent = provision(client, mini_ca, inject=False)
        assert device.reboots > 3
    check_credential_directory(store, sent)


@pytest.mark.parametrize("link", LINKS)
def test_pulled_cable_is_a_clear_error(tmp_path, link: str) -> None:
    device = VirtualDevice(str(tmp_path / "device"), link).start()
    with DeviceClient.open(device.address, timeout=0.05, retries=2) as client:
        client.hello()
        device.stop()
        with pytest.raises(DeviceGoneError) as caught:
            client.hello()
        assert caught.value.command == "HELLO"
        assert device.address in str(caught.value)


def test_upload_resumes_after_pulled_cable(tmp_path, mini_ca) -> None:
    """Cut the cable mid-upload; a new session on a new cable continues at the watermark."""
    store = str(tmp_path / "device")
    data = mini_ca.chain_pem + mini_ca.root_pem
    device = VirtualDevice(store, "pty").start()

    def pull_after_two_chunks(sent: int, _total: int) -> None:
        if sent >= 128:
            device.stop()

    with (
        DeviceClient.open(device.address, timeout=0.05, retries=2, chunk_size=64) as client,
        pytest.raises(DeviceGoneError),
    ):
        client.put_object(ObjectKind.CHAIN, data, pull_after_two_chunks)
    with (
        VirtualDevice(store, "socket://127.0.0.1:0") as device2,
        DeviceClient.open(device2.address, timeout=0.2) as client,
    ):
        assert client.hello().has_staged
        result = client.put_object(ObjectKind.CHAIN, data)
        assert result.resumed_from >= 128
        assert client.commit() == {ObjectKind.CHAIN}
        assert client.verify(ObjectKind.CHAIN) == hashlib.sha256(data).hexdigest()


def test_factory_reset_over_the_link(tmp_path, mini_ca) -> None:
    store = str(tmp_path / "device")
    with (
        VirtualDevice(store, "pty", hardware_serial="SN-77") as device,
        DeviceClient.open(device.address, timeout=0.2) as client,
    ):
        provision(client, mini_ca, inject=False)
        client.factory_reset()
        info = client.hello()
        assert (info.state, info.hardware_serial, info.has_key) == (
            DeviceState.FACTORY,
            "SN-77",
            False,
        )
    assert [n for n in os.listdir(store) if not n.startswith(".")] == []


def test_pty_port_is_exclusive(tmp_path) -> None:
    """Two stations cannot drive one device: the second open of a real tty is refused."""
    with (
        VirtualDevice(str(tmp_path / "device"), "pty") as device,
        DeviceClient.open(device.address, timeout=0.2) as client,
    ):
        client.hello()
        with pytest.raises(PortError):
            DeviceClient.open(device.address)


def test_run_emulator_announces_and_serves(tmp_path) -> None:
    """The entry point the CLI mounts: announces the bound address, serves until stopped."""
    ready: list[VirtualDevice] = []
    stop = threading.Event()
    announced = threading.Event()

    def on_ready(device: VirtualDevice) -> None:
        ready.append(device)
        announced.set()

    thread = threading.Thread(
        target=run_emulator,
        args=(str(tmp_path / "device"), "socket://127.0.0.1:0"),
        kwargs={"on_ready": on_ready, "stop": stop, "hardware_serial": "SN-1"},
        daemon=True,
    )
    thread.start()
    assert announced.wait(10)
    device = ready[0]
    assert device.port
    assert device.address == f"socket://127.0.0.1:{device.port}"
    with DeviceClient.open(device.address, timeout=0.2) as client:
        assert client.hello().hardware_serial == "SN-1"
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
