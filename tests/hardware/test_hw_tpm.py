"""hardware.tpm against a real software TPM (swtpm): keys made, used and never exported.

Every test runs on every CI run (``needs_swtpm``: a missing swtpm fails under CI=true). The
``swtpm`` fixture fails a test that leaves an object loaded in the TPM: without a resource manager
swtpm has three transient slots, and a leak would break whatever runs next.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hardware.codec import Command, ObjectKind, Status
from hardware.keygen import TpmBackend, backend_for
from hardware.messages import pack_put_begin_request, unpack_hello_response
from hardware.responder import Responder
from hardware.store import CredentialStore
from hardware.tpm import Tpm, TpmError, is_tpm_blob, resolve_tcti
from tests.conftest import (
    CLI,
    OPENSSL,
    Result,
    SoftTpm,
    assert_one_line_error,
    needs_swtpm,
)
from tests.hardware.hw_helpers import MiniCA, Station, make_key
from tests.hardware.test_hw_responder import genkey, put

pytestmark = needs_swtpm


def _issue(tmp_path: Path, mini_ca: MiniCA, tpm: Tpm, name: str = "dev-1") -> tuple[Path, Path]:
    """A TPM key and a certificate for it (leaf + issuing CA), as a credential directory has."""
    blob = tpm.generate()
    csr = x509.load_der_x509_csr(tpm.csr(blob, name))
    assert csr.is_signature_valid
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key_file, cert_file = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    key_file.write_bytes(blob)
    cert_file.write_bytes(mini_ca.issue(key, name) + mini_ca.chain_pem)
    return key_file, cert_file


def _server(tmp_path: Path, mini_ca: MiniCA) -> ssl.SSLContext:
    """A server that requires a client certificate from ``mini_ca`` (the broker's stance)."""
    key_pem, public = make_key()
    (tmp_path / "server.key").write_bytes(key_pem)
    (tmp_path / "server.crt").write_bytes(mini_ca.issue(public, "server"))
    (tmp_path / "root.crt").write_bytes(mini_ca.root_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tmp_path / "root.crt")
    return ctx


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> ssl.SSLObject:
    """A full TLS handshake over memory BIOs; returns the server's end."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [client.wrap_bio(c_in, c_out), server.wrap_bio(s_in, s_out, server_side=True)]
    done: set[int] = set()
    for _ in range(16):
        for i, end in enumerate(ends):
            if i not in done:
                try:
                    end.do_handshake()
                    done.add(i)
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            return ends[1]
    pytest.fail("the handshake did not finish")


def _client(version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's certificate is not what these tests are about
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_tcti_comes_from_the_argument_then_the_environment_then_tpmrm0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IOTAUTH_TPM_TCTI", raising=False)
    assert resolve_tcti() == "device:/dev/tpmrm0"
    monkeypatch.setenv("IOTAUTH_TPM_TCTI", "swtpm:port=1")
    assert resolve_tcti() == "swtpm:port=1"
    assert resolve_tcti("device:/dev/tpm0") == "device:/dev/tpm0"


def test_key_is_made_in_the_tpm_and_the_csr_is_signed_there(swtpm: SoftTpm) -> None:
    tpm = Tpm(swtpm.tcti)
    blob = tpm.generate()
    assert is_tpm_blob(blob)
    der = tpm.csr(blob, "dev-7", uri="spiffe://fleet.example/device/dev-7")
    csr = x509.load_der_x509_csr(der)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == "CN=dev-7"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/device/dev-7"
    ]
    spki = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert tpm.public_key(blob) == spki
    # openssl, the independent judge, agrees that the TPM's signature verifies.
    judged = subprocess.run(
        [str(OPENSSL), "req", "-inform", "DER", "-verify", "-noout"],
        input=der,
        capture_output=True,
        check=False,
    )
    assert judged.returncode == 0, judged.stderr
    # Two keys from one TPM are two keys.
    assert tpm.public_key(tpm.generate()) != spki


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_mutual_tls_with_the_tpm_key(
    swtpm: SoftTpm, mini_ca: MiniCA, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    tpm = Tpm(swtpm.tcti)
    key_file, cert_file = _issue(tmp_path, mini_ca, tpm)
    server = _server(tmp_path, mini_ca)
    client = _client(version)
    tpm.load_cert_chain(client, cert_file, key_file)
    # More handshakes than the TPM has object slots: each signature flushes what it loaded.
    for _ in range(4):
        end = _handshake(client, server)
        assert end.version() == version.name.replace("v1_", "v1.")
        assert end.getpeercert()["subject"] == ((("commonName", "dev-1"),),)


def test_a_certificate_for_another_key_is_refused_before_any_handshake(
    swtpm: SoftTpm, mini_ca: MiniCA, tmp_path: Path
) -> None:
    tpm = Tpm(swtpm.tcti)
    key_file, _ = _issue(tmp_path, mini_ca, tpm, "dev-1")
    _, other_cert = _issue(tmp_path, mini_ca, tpm, "dev-2")
    with pytest.raises(ValueError, match=r"dev-1\.key .* does not belong to dev-2\.crt"):
        tpm.load_cert_chain(_client(ssl.TLSVersion.TLSv1_3), other_cert, key_file)


def test_the_key_cannot_be_exported(swtpm: SoftTpm, tmp_path: Path) -> None:
    blob = Tpm(swtpm.tcti).generate()
    key_file = tmp_path / "device.key"
    key_file.write_bytes(blob)
    # Not a private key to anything that reads PEM keys...
    with pytest.raises(ValueError, match="no BEGIN/END delimiters for a private key"):
        serialization.load_pem_private_key(blob, password=None)
    plain = subprocess.run(
        [str(OPENSSL), "pkey", "-in", key_file], capture_output=True, check=False
    )
    assert plain.returncode != 0
    # ... and the TPM itself refuses to hand out the private part, whichever form is asked for.
    env = {**os.environ, "TPM2OPENSSL_TCTI": swtpm.tcti, "TSS2_LOG": "all+NONE"}
    tpm2 = ["-provider", "tpm2", "-provider", "default"]
    for export in (
        ["pkcs8", "-topk8", "-nocrypt", *tpm2, "-in", key_file],
        ["pkey", "-traditional", *tpm2, "-in", key_file],
    ):
        attempt = subprocess.run([str(OPENSSL), *export], capture_output=True, env=env, check=False)
        assert attempt.returncode != 0, export
        assert b"BEGIN PRIVATE KEY" not in attempt.stdout
        assert b"BEGIN EC PRIVATE KEY" not in attempt.stdout
    # The reason: the TPM made the key with fixedTPM and fixedParent (never duplicated out of
    # this TPM) and sensitiveDataOrigin (the private part was born inside it).
    shown = subprocess.run(
        [str(OPENSSL), "pkey", *tpm2, "-in", key_file, "-text", "-noout"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    for attribute in ("fixedTPM", "fixedParent", "sensitiveDataOrigin"):
        assert attribute in shown
    assert "priv:" not in shown


def test_another_tpm_cannot_use_the_key(
    swtpm: SoftTpm, make_swtpm: object, mini_ca: MiniCA, tmp_path: Path
) -> None:
    key_file, cert_file = _issue(tmp_path, mini_ca, Tpm(swtpm.tcti))
    assert callable(make_swtpm)
    other = Tpm(make_swtpm().tcti)
    with pytest.raises(TpmError) as refused:
        other.public_key(key_file.read_bytes(), name="device.key")
    message = str(refused.value)
    assert other.tcti in message
    assert "device.key" in message
    assert "\n" not in message
    with pytest.raises(TpmError):
        other.load_cert_chain(_client(ssl.TLSVersion.TLSv1_3), cert_file, key_file)
    with pytest.raises(TpmError):
        other.sign_digest(key_file.read_bytes(), b"\0" * 32)
    # The backend that the responder uses says "not ours" the same way (an OSError to it).
    with pytest.raises(OSError, match=r"device\.key"):
        TpmBackend(other.tcti).key_matches_cert(key_file.read_bytes(), cert_file.read_bytes())


def test_a_tpm_gone_after_start_fails_the_handshake_with_its_reason_logged(
    make_swtpm: Callable[[], SoftTpm],
    mini_ca: MiniCA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft = make_swtpm()
    tpm = Tpm(soft.tcti)
    key_file, cert_file = _issue(tmp_path, mini_ca, tpm)
    client = _client(ssl.TLSVersion.TLSv1_3)
    tpm.load_cert_chain(client, cert_file, key_file)
    server = _server(tmp_path, mini_ca)
    _handshake(client, server)  # works while the TPM is there
    soft.stop()
    with pytest.raises(ssl.SSLError), caplog.at_level("WARNING", logger="hardware.tpm"):
        _handshake(client, server)
    [record] = [r for r in caplog.records if r.name == "hardware.tpm"]
    assert record.getMessage().startswith(f"TPM at {soft.tcti}, key {key_file.name}: ")


def test_an_absent_tpm_is_one_line_naming_the_tcti(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    cases = {
        f"swtpm:host=127.0.0.1,port={port}": "no TPM answers",
        f"device:{tmp_path / 'tpmrm0'}": "does not exist",
    }
    not_a_tpm = tmp_path / "not-a-tpm"
    not_a_tpm.write_bytes(b"")
    cases[f"device:{not_a_tpm}"] = "does not answer"
    for tcti, reason in cases.items():
        with pytest.raises(TpmError) as failed:
            Tpm(tcti).check()
        message = str(failed.value)
        assert message.startswith(f"TPM at {tcti}: "), message
        assert reason in message
        assert "\n" not in message


def test_backend_for_names_the_key_stores() -> None:
    assert backend_for("file").keystore == "file"
    assert backend_for("tpm", "swtpm:port=1").keystore == "tpm"
    with pytest.raises(ValueError, match="unknown key store 'hsm'"):
        backend_for("hsm")


# -- the responder with a TPM key store ------------------------------------------------------------


def _tpm_station(tmp_path: Path, tcti: str) -> Station:
    store = CredentialStore(tmp_path / "dev")
    return Station(Responder(store, hardware_serial="HW-TPM", backend=TpmBackend(tcti)))


def test_a_tpm_device_says_so_and_refuses_an_injected_key(tmp_path: Path) -> None:
    """HELLO carries the TPM flag; PUT of a KEY is FORBIDDEN (no TPM needed for either)."""
    station = _tpm_station(tmp_path, "swtpm:host=127.0.0.1,port=1")
    hello = unpack_hello_response(station.ask(Command.HELLO, b"\x01").payload)
    assert hello.keys_in_tpm
    assert hello.can_genkey
    key_pem, _ = make_key()
    begin = station.ask(
        Command.PUT_BEGIN, pack_put_begin_request(ObjectKind.KEY, len(key_pem), b"\0" * 32)
    )
    assert begin.status == Status.FORBIDDEN
    # The negative twin: a file-key device has no such flag and takes the key.
    plain = Station(
        Responder(CredentialStore(tmp_path / "plain"), hardware_serial="HW-1", backend=None)
    )
    assert not unpack_hello_response(plain.ask(Command.HELLO, b"\x01").payload).keys_in_tpm


def test_commit_checks_the_certificate_against_the_tpm_key(
    swtpm: SoftTpm, mini_ca: MiniCA, tmp_path: Path
) -> None:
    station = _tpm_station(tmp_path, swtpm.tcti)
    csr_der = genkey(station, "dev-tpm")
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    staged = station.responder.store.staged_bytes(ObjectKind.KEY)
    assert is_tpm_blob(staged)
    # A certificate for another key is refused at COMMIT...
    _, other_public = make_key()
    put(station, ObjectKind.CERT, mini_ca.issue(other_public, "dev-tpm"))
    put(station, ObjectKind.CHAIN, mini_ca.chain_pem)
    assert station.ask(Command.COMMIT).status == Status.KEY_MISMATCH
    # ... the one for the TPM's key is stored with it, and the key file is the blob.
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    put(station, ObjectKind.CERT, mini_ca.issue(public, "dev-tpm"))
    assert station.ask(Command.COMMIT).status == Status.OK
    assert is_tpm_blob((tmp_path / "dev" / "device.key").read_bytes())


# -- the command line ------------------------------------------------------------------------------


def _emulate(store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "hw", "emulate", "--store", str(store), "--link", "socket://127.0.0.1:0", *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--keystore", "hsm"], "--keystore must be one of file, tpm"),
        (["--tpm", "swtpm:port=1"], "--tpm needs --keystore tpm"),
        (["--keystore", "tpm", "--no-keygen"], "--no-keygen contradicts --keystore tpm"),
        (
            ["--keystore", "tpm", "--tpm", "device:/nonexistent/tpmrm0"],
            "TPM at device:/nonexistent/tpmrm0: /nonexistent/tpmrm0 does not exist",
        ),
    ],
)
def test_hw_emulate_keystore_errors_are_one_line(
    tmp_path: Path, extra: list[str], fragment: str
) -> None:
    result = _emulate(tmp_path / "dev", *extra)
    assert_one_line_error(Result(result.returncode, result.stdout, result.stderr), fragment)


def test_hw_serve_names_an_absent_tpm(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "hw", "serve", "--port", "/dev/null", "--store", str(tmp_path / "s"),
         "--keystore", "tpm", "--tpm", "device:/nonexistent/tpmrm0"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert_one_line_error(
        Result(result.returncode, result.stdout, result.stderr), "/nonexistent/tpmrm0"
    )
