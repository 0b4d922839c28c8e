"""A device whose key lives in a TPM 2.0 (swtpm), from the bench to renewal.

A virtual device backed by the swtpm is provisioned over a pty with the real station; its key is
made in the TPM on GENKEY and the credential directory keeps only the TPM-wrapped blob. The real
agent then connects with that key (mutual TLS through a stock ``ssl.SSLContext``) to our broker
and to a Mosquitto started from ``iotauth broker export``, and renews into a new TPM key. The
negative twins: a key of another TPM, or another key of the same TPM, next to the certificate is
refused by the agent before it connects, in one line naming the TCTI and the key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import tests.broker.test_broker_export_mosquitto as exported
from broker.server import BrokerThread
from device_agent import Agent, AgentConfig, CredentialError, load_credentials
from device_agent.keygen import make_key_and_csr
from hardware.emulator import VirtualDevice
from hardware.keygen import TpmBackend
from hardware.tpm import Tpm, is_tpm_blob
from provisioning.pki import PKI
from provisioning.station import provision
from tests.broker.broker_helpers import Fleet
from tests.conftest import Result, SoftTpm, assert_one_line_error, needs_swtpm, openssl_verify
from tests.device_agent.agent_helpers import Sink, wait_until
from tests.device_agent.conftest import Creds, connected

pytestmark = needs_swtpm

mosquitto = exported.mosquitto  # Mosquitto from `iotauth broker export`, as the export tests run it
_PRIVATE_PEM = (
    b"BEGIN PRIVATE KEY",
    b"BEGIN EC PRIVATE KEY",
    b"BEGIN ENCRYPTED PRIVATE KEY",
    b"BEGIN RSA PRIVATE KEY",
)


@pytest.fixture
def fleet(pki: PKI, tmp_path: Path) -> Fleet:
    """The agent tests' PKI under the name the exported-Mosquitto fixture asks for."""
    return Fleet(pki, tmp_path)


def _provision_tpm_device(pki: PKI, tpm: SoftTpm, root: Path, name: str = "dev-tpm") -> Path:
    store = root / "devices" / name
    with VirtualDevice(store, "pty", backend=TpmBackend(tpm.tcti)) as device:
        result = provision(pki, device.address, device_id=name)
    assert result.ok
    assert result.key_mode == "device"
    return store


def _assert_no_private_key_on_disk(store: Path) -> None:
    """Every file of the credential directory (staging and renewal areas too)."""
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for marker in _PRIVATE_PEM:
            assert marker not in data, f"{path} holds a PEM private key"


def test_tpm_device_provisioned_over_serial_connects_to_our_broker_and_mosquitto(
    pki: PKI,
    swtpm: SoftTpm,
    broker: BrokerThread,
    creds: Creds,
    agents: Callable[..., Agent],
    mosquitto: Callable[..., exported.Mosquitto],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _provision_tpm_device(pki, swtpm, tmp_path)
    # The directory records its key store and holds only the TPM's wrapped blob.
    identity = json.loads((store / "identity.json").read_text())
    assert identity["keystore"] == "tpm"
    blob = (store / "device.key").read_bytes()
    assert is_tpm_blob(blob)
    assert oct((store / "device.key").stat().st_mode & 0o777) == "0o600"
    _assert_no_private_key_on_disk(store)
    # The certificate is for the TPM's key, and openssl accepts it as a client certificate.
    cert = x509.load_pem_x509_certificate((store / "device.crt").read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki == Tpm(swtpm.tcti).public_key(blob)
    leaf = tmp_path / "leaf.crt"
    leaf.write_bytes(cert.public_bytes(Encoding.PEM))
    judged = openssl_verify(pki.path, leaf)
    assert judged.returncode == 0, judged.stderr
    # The ledger says where the key lives.
    issue = [
        json.loads(line)
        for line in (pki.path / "ledger.jsonl").read_text().splitlines()
        if '"issue"' in line
    ][-1]
    assert issue["data"]["device_keystore"] == "tpm"

    monkeypatch.setenv("IOTAUTH_TPM_TCTI", swtpm.tcti)
    # Our broker.
    sink = Sink(creds("sink", service=True), broker.port, "sink")
    try:
        agent = agents(store, broker.port, telemetry_interval=0.2)
        assert connected(agent), agent.stats.last_failure
        assert wait_until(lambda: len(sink.telemetry_ids("dev-tpm")) >= 2), sink.messages
        assert broker.broker.audit.events("connect", client_id="dev-tpm")
    finally:
        sink.close()
    # The exported Mosquitto (its inventory now includes the device and the sink).
    m = mosquitto()
    sink = Sink(creds("sink", service=True), m.port, "sink")
    try:
        again = agents(store, m.port, telemetry_interval=0.2)
        assert connected(again), again.stats.last_failure
        assert wait_until(lambda: len(sink.telemetry_ids("dev-tpm")) >= 2), sink.messages
    finally:
        sink.close()
    assert again.stats.failures == {}


@pytest.mark.parametrize("foreign", ["another TPM's key", "another key of this TPM"])
def test_a_certificate_with_a_foreign_tpm_key_is_refused_before_connecting(
    pki: PKI,
    swtpm: SoftTpm,
    make_swtpm: Callable[[], SoftTpm],
    broker: BrokerThread,
    cli: Callable[..., Result],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    foreign: str,
) -> None:
    store = _provision_tpm_device(pki, swtpm, tmp_path)
    if foreign == "another TPM's key":
        other = make_swtpm()
        (store / "device.key").write_bytes(Tpm(other.tcti).generate())
        reason = "cannot load the key"
    else:
        (store / "device.key").write_bytes(Tpm(swtpm.tcti).generate())
        reason = "does not belong to device.crt"
    monkeypatch.setenv("IOTAUTH_TPM_TCTI", swtpm.tcti)
    with pytest.raises(CredentialError, match=reason):
        Agent(AgentConfig(store=store, broker=f"127.0.0.1:{broker.port}", queue_path=":memory:"))
    # The agent's command says so in one line naming the TPM and the key, and exits.
    result = cli(
        "agent",
        "run",
        "--store",
        str(store),
        "--broker",
        f"127.0.0.1:{broker.port}",
        env={"IOTAUTH_TPM_TCTI": swtpm.tcti},
    )
    assert_one_line_error(result, swtpm.tcti, "device.key", reason)
    # Refused before it connected: the broker never saw a handshake.
    assert not broker.broker.audit.events(client_id="dev-tpm")
    assert not broker.broker.audit.events("refuse")


def test_the_identity_dies_with_the_tpm(
    pki: PKI,
    swtpm: SoftTpm,
    make_swtpm: Callable[[], SoftTpm],
    cli: Callable[..., Result],
    tmp_path: Path,
) -> None:
    """A replaced board (same files, another TPM) cannot use the old identity: re-provision."""
    store = _provision_tpm_device(pki, swtpm, tmp_path)
    new_board = make_swtpm()
    result = cli(
        "agent",
        "run",
        "--store",
        str(store),
        "--broker",
        "127.0.0.1:1",
        env={"IOTAUTH_TPM_TCTI": new_board.tcti},
    )
    assert_one_line_error(result, new_board.tcti, "device.key", "made by another TPM")


def test_renewal_makes_the_new_key_in_the_tpm(
    pki: PKI,
    swtpm: SoftTpm,
    broker: BrokerThread,
    agents: Callable[..., Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _provision_tpm_device(pki, swtpm, tmp_path)
    monkeypatch.setenv("IOTAUTH_TPM_TCTI", swtpm.tcti)
    old = load_credentials(store)
    old_blob = (store / "device.key").read_bytes()
    agent = agents(store, broker.port)
    assert connected(agent), agent.stats.last_failure
    agent.request_renewal()
    assert wait_until(lambda: agent.stats.renewals == 1, 20), agent.stats.last_failure
    new = load_credentials(store)
    assert new.serial != old.serial
    new_blob = (store / "device.key").read_bytes()
    assert is_tpm_blob(new_blob)
    assert new_blob != old_blob
    assert json.loads((store / "identity.json").read_text())["keystore"] == "tpm"
    _assert_no_private_key_on_disk(store)
    # Make-before-break: the agent reconnected with the new TPM key and the broker saw it.
    assert agent.credentials.serial == new.serial
    assert wait_until(
        lambda: broker.broker.audit.events("connect", client_id="dev-tpm", credential=new.serial)
    )
    rows = {r.serial: r for r in pki.registry.history("dev-tpm")}
    assert rows[new.serial].status == "active"
    assert rows[new.serial].key_origin == "csr"
    # The service records the new certificate once it saw it used, and supersedes the old one.
    assert wait_until(
        lambda: (
            {r.serial: r.status for r in pki.registry.history("dev-tpm")}[old.serial] == "revoked"
        )
    )


def test_the_renewal_child_makes_the_key_in_the_tpm_without_cryptography(
    swtpm: SoftTpm, tmp_path: Path
) -> None:
    """The agent's key generator child with a TPM key store: TSS2 blob, TPM-signed CSR, and no
    cryptography imported (the agent's memory budget does not pay for it)."""
    key_file, csr_file = tmp_path / "device.key", tmp_path / "csr.pem"
    spiffe = "spiffe://fleet.example/device/dev-tpm"
    probe = (
        "import sys\n"
        "from device_agent.keygen import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert 'cryptography' not in sys.modules, 'the child imported cryptography'\n"
        "raise SystemExit(rc)\n"
    )
    argv = [
        str(key_file),
        str(csr_file),
        "dev-tpm",
        spiffe,
        "--keystore=tpm",
        f"--tpm={swtpm.tcti}",
    ]
    child = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=False
    )
    assert child.returncode == 0, child.stderr
    blob = key_file.read_bytes()
    assert is_tpm_blob(blob)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    csr = x509.load_pem_x509_csr(csr_file.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=dev-tpm"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki == Tpm(swtpm.tcti).public_key(blob)
    # make_key_and_csr hands the key store to that child: here in-process (cryptography is
    # loaded in the test process), with the same result shape.
    make_key_and_csr(
        tmp_path / "k2",
        tmp_path / "c2",
        device_id="dev-tpm",
        spiffe_id=spiffe,
        keystore=TpmBackend(swtpm.tcti),
    )
    assert is_tpm_blob((tmp_path / "k2").read_bytes())


def test_the_renewal_child_names_an_absent_tpm(tmp_path: Path) -> None:
    tcti = f"device:{tmp_path / 'tpmrm0'}"
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from device_agent.keygen import main; raise SystemExit(main())",
            str(tmp_path / "k"),
            str(tmp_path / "c"),
            "dev-tpm",
            "spiffe://fleet.example/device/dev-tpm",
            "--keystore=tpm",
            f"--tpm={tcti}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert child.returncode == 1
    assert (
        child.stderr.strip() == f"error: TPM at {tcti}: {tmp_path / 'tpmrm0'} does not exist "
        "(no TPM, or its device-tree overlay is not enabled)"
    )
    assert not (tmp_path / "k").exists()


def test_a_tpm_device_signs_its_token_in_the_tpm_and_connects_with_jwt(
    pki: PKI,
    swtpm: SoftTpm,
    creds: Creds,
    agents: Callable[..., Agent],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--auth jwt with a TPM key store: the TPM signs the JWS signing input's digest, PyJWT's
    helpers make the raw r||s ES256 signature, and the token verifies against the certificate.
    The token child needs no key file (there is none); the agent connects to the jwt listener.
    Negative twin: the same directory with another TPM is refused with the TCTI named."""
    import jwt as pyjwt

    from broker.settings import BrokerSettings, ListenerSpec
    from device_agent.token import TokenSigningError, make_token

    store = _provision_tpm_device(pki, swtpm, tmp_path)
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "from device_agent.token import main; raise SystemExit(main())",
            str(store),
            "dev-tpm",
            "--ttl=300",
            f"--tpm={swtpm.tcti}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    token = child.stdout.strip()
    cert = x509.load_pem_x509_certificate((store / "device.crt").read_bytes())
    claims = pyjwt.decode(token, cert.public_key(), algorithms=["ES256"], audience="fleet.example")
    assert claims["sub"] == "dev-tpm"
    assert pyjwt.get_unverified_header(token)["alg"] == "ES256"
    with pytest.raises(TokenSigningError, match="tpm"):
        make_token(store, "dev-tpm", ttl=60, tcti=f"device:{tmp_path / 'no-tpm'}")

    monkeypatch.setenv("IOTAUTH_TPM_TCTI", swtpm.tcti)
    listeners = (ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"jwt"})))
    broker = BrokerThread(
        BrokerSettings(pki.path, listeners=listeners, renewal=None), audit_sink=lambda _: None
    ).start()
    try:
        _mtls_port, jwt_port = list(broker.broker.ports.values())
        agent = agents(store, jwt_port, auth="jwt")
        assert connected(agent, 30), agent.stats.last_failure
        assert broker.broker.audit.events("connect", client_id="dev-tpm")
    finally:
        broker.stop()
