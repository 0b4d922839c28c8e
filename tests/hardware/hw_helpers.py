"""Helpers shared by the hardware tests: a tiny in-memory CA and a byte-level station.

The CA is local on purpose: ``hardware`` must stand on its own, so its tests do not lean on
``provisioning`` (which has its own tests of real issuance).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hardware.codec import Frame, FrameDecoder, encode_frame
from hardware.responder import Responder

PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


@dataclass
class MiniCA:
    """A root and an issuing CA; ``issue`` signs a device certificate for any public key."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey
    issuing: x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(PEM)

    @property
    def chain_pem(self) -> bytes:
        return self.issuing.public_bytes(PEM)

    def issue(self, public_key: ec.EllipticCurvePublicKey, device_id: str) -> bytes:
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(device_id))
            .issuer_name(self.issuing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://test.example/device/{device_id}")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.issuing_key, hashes.SHA256())
        )
        return cert.public_bytes(PEM)

    def issue_for_csr(self, csr_pem: bytes, device_id: str) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return self.issue(key, device_id)


def new_ca() -> MiniCA:
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    return MiniCA(
        root_key=root_key,
        root=_ca_cert("test root", root_key, "test root", root_key),
        issuing_key=issuing_key,
        issuing=_ca_cert("test issuing", issuing_key, "test root", root_key),
    )


def make_key() -> tuple[bytes, ec.EllipticCurvePublicKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, key.public_key()


def identity_json(device_id: str) -> bytes:
    return json.dumps({"device_id": device_id, "trust_domain": "test.example"}).encode() + b"\n"


class Station:
    """Speaks to a ``Responder`` through real encoded bytes, with explicit sequence numbers."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.seq = 0

    def wire(self, cmd: int, payload: bytes = b"", seq: int | None = None) -> bytes:
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
            seq = self.seq
        return encode_frame(Frame(cmd, seq, 0, payload))

    def send_bytes(self, data: bytes) -> Frame | None:
        out = self.responder.receive_data(data)
        decoder = FrameDecoder()
        decoder.receive_data(out)
        frames = []
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
        assert len(frames) <= 1
        return frames[0] if frames else None

    def ask(self, cmd: int, payload: bytes = b"", seq: int | None = None) -> Frame:
        reply = self.send_bytes(self.wire(cmd, payload, seq))
        assert reply is not None
        assert reply.cmd == cmd | 0x80
        return reply
