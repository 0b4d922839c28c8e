"""The renewal key and CSR, made where loading ``cryptography`` costs the agent nothing.

``cryptography`` carries its own OpenSSL (about 11 MB of RSS in the agent once imported, and it
stays until the process ends). The agent needs it for exactly one thing: a new P-256 key and a CSR
when a renewal begins (checking the answer is done by the stdlib ``ssl``, see
``device_agent.renewal``). So :func:`make_key_and_csr` runs :func:`generate` in a short-lived
child (:func:`main` with the arguments ``KEY CSR DEVICE_ID SPIFFE_ID``), which writes both files
itself: the private key never crosses a pipe or an argument list, only paths and names do. The
child reports failure with a non-zero exit status and one line on stderr.

Where ``cryptography`` is already loaded (the fleet simulator runs thousands of agents in one
process that imported it for the PKI) there is no memory to save and a child per simulated device
would be slow, so :func:`generate` runs in-process. Both ways run the same function.

Both files are written with ``provisioning.keyfiles.atomic_write``, the project's one writer of key
files (0600 from the first byte, fsync, rename, directory fsync).

With a TPM key store (``keystore="tpm"``) the new key is made inside the TPM and the key file gets
only its TPM-wrapped blob; the CSR is signed by the TPM. That runs in the child too: it needs no
``cryptography`` at all, but it keeps the agent's one TPM binding and its ctypes out of the
agent's memory, and a TPM that serves one connection at a time is busy only while the child runs.
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.errors import RenewalError
from provisioning.keyfiles import KEY_MODE, atomic_write

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from hardware.keygen import KeyBackend

__all__ = ["KEYGEN_TIMEOUT", "generate", "main", "make_csr", "make_key_and_csr"]

# Generous: on a Pi Zero the child's interpreter start and imports take a few seconds; a P-256 key
# takes milliseconds. The bound only stops a wedged child from stalling the agent's loop forever.
KEYGEN_TIMEOUT = 60.0
# `-c`, not `-m device_agent.keygen`: importing the package already imports this module (through
# device_agent.renewal), and runpy would then run a second copy as __main__ with a RuntimeWarning.
_CHILD = "from device_agent.keygen import main; raise SystemExit(main())"


def make_csr(key: ec.EllipticCurvePrivateKey, *, device_id: str, spiffe_id: str) -> bytes:
    """A CSR naming the device (CN and SAN URI); the service checks both against the topic."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def generate(
    key_file: Path,
    csr_file: Path,
    *,
    device_id: str,
    spiffe_id: str,
    keystore: str = "file",
    tcti: str | None = None,
) -> None:
    """A new P-256 key (0600) and its CSR (PEM), each written atomically.

    ``keystore`` ``file``: the key is PKCS#8 PEM. ``tpm``: the key is made in the TPM at ``tcti``
    and the file holds its TSS2 PEM blob.
    """
    if keystore != "file":
        from hardware.keygen import backend_for

        blob, csr_der = backend_for(keystore, tcti).generate(device_id, uri=spiffe_id)
        body = base64.encodebytes(csr_der).decode("ascii")
        csr_pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
        atomic_write(key_file, blob, mode=KEY_MODE)
        atomic_write(csr_file, csr_pem.encode("ascii"), mode=0o644)
        return
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    csr = make_csr(key, device_id=device_id, spiffe_id=spiffe_id)
    atomic_write(key_file, key_pem, mode=KEY_MODE)
    atomic_write(csr_file, csr, mode=0o644)


def make_key_and_csr(
    key_file: Path,
    csr_file: Path,
    *,
    device_id: str,
    spiffe_id: str,
    timeout: float = KEYGEN_TIMEOUT,
    keystore: KeyBackend | None = None,
) -> None:
    """:func:`generate`, in a child process unless this one has loaded ``cryptography`` already.

    ``keystore`` is the credential directory's (``None``: a PEM file).

    Raises RenewalError with the child's reason if it fails; OSError from writing in-process.
    """
    # An embedded interpreter may have no sys.executable to start: pay the memory rather than
    # never renew.
    from hardware.keygen import TpmBackend

    store = "file" if keystore is None else keystore.keystore
    tcti = keystore.tcti if isinstance(keystore, TpmBackend) else None
    if "cryptography" in sys.modules or not sys.executable:
        generate(
            key_file,
            csr_file,
            device_id=device_id,
            spiffe_id=spiffe_id,
            keystore=store,
            tcti=tcti,
        )
        return
    argv = [
        sys.executable,
        "-c",
        _CHILD,
        str(key_file),
        str(csr_file),
        device_id,
        spiffe_id,
    ]
    if store != "file":
        argv.append(f"--keystore={store}")
    if tcti is not None:
        argv.append(f"--tpm={tcti}")
    try:
        # stdin/stdout closed: the child has nothing to read, and nothing but files to produce.
        # stderr carries the reason on failure (the key is written to key_file, never printed).
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        msg = f"key generation did not finish within {timeout:g} s"
        raise RenewalError(msg, device_id=device_id) from None
    except OSError as exc:
        msg = f"cannot start key generation ({sys.executable}): {exc}"
        raise RenewalError(msg, device_id=device_id) from None
    if proc.returncode != 0:
        # The last line: the child's own `error:` line, or the exception line of a traceback
        # (import-time profiling or warnings may precede it).
        lines = [line.strip() for line in proc.stderr.decode(errors="replace").splitlines()]
        reason = next((line for line in reversed(lines) if line), "no reason given")
        msg = f"key generation failed (exit status {proc.returncode}): {reason}"
        raise RenewalError(msg, device_id=device_id)


def main(argv: Sequence[str] | None = None) -> int:
    """The child's command line: ``KEY CSR DEVICE_ID SPIFFE_ID [--keystore K] [--tpm TCTI]``.

    Exit status 0, or 1 with one stderr line.
    """
    parser = argparse.ArgumentParser(prog="device_agent.keygen")
    parser.add_argument("key", type=Path, help="where to write the private key (0600)")
    parser.add_argument("csr", type=Path, help="where to write the CSR")
    parser.add_argument("device_id")
    parser.add_argument("spiffe_id")
    parser.add_argument("--keystore", choices=("file", "tpm"), default="file")
    parser.add_argument("--tpm", dest="tcti", default=None, help="TSS2 TCTI of the TPM")
    args = parser.parse_args(argv)
    try:
        generate(
            args.key,
            args.csr,
            device_id=args.device_id,
            spiffe_id=args.spiffe_id,
            keystore=args.keystore,
            tcti=args.tcti,
        )
    except Exception as exc:  # noqa: BLE001 - whatever failed, the parent reads one line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0
