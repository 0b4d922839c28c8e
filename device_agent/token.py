"""Device tokens for ``--auth jwt``, signed where loading ``cryptography`` costs the agent nothing.

With ``auth = "jwt"`` the agent does not present its certificate: it signs a device token (a
compact JWS, the contract is ``provisioning.tokens``) with its own key and sends it as the MQTT
password over server-authenticated TLS. Signing needs PyJWT and ``cryptography`` (about 11 MB of
RSS that would stay until the process ends), so, as ``device_agent.keygen`` does for renewal keys,
:func:`make_token` runs ``provisioning.tokens.token_for_credentials`` in a short-lived child
(:func:`main`: ``CRED_DIR DEVICE_ID --ttl S [--tpm TCTI] [--audience A]``) that prints the token
on stdout.
The private key never leaves the child (or the TPM, for a ``keystore: tpm`` directory, where the
TPM signs the digest); only the token, which is what the agent sends anyway, crosses the pipe.
Where ``cryptography`` is loaded already (the fleet simulator) the same function runs in-process.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import TokenSigningError
from provisioning.errors import ProvisioningError

__all__ = ["TOKEN_TIMEOUT", "DeviceToken", "TokenSigningError", "main", "make_token"]

# As device_agent.keygen: a slow device's interpreter start dominates; ECDSA takes milliseconds.
TOKEN_TIMEOUT = 60.0
_CHILD = "from device_agent.token import main; raise SystemExit(main())"


@dataclass(frozen=True, slots=True)
class DeviceToken:
    """A signed token and the lifetime it claims (``iat``/``exp``, seconds since the epoch)."""

    value: str
    issued_at: float
    expires_at: float

    def renew_at(self, fraction: float) -> float:
        """When ``fraction`` of the lifetime has passed: time to reconnect with a fresh one."""
        return self.issued_at + (self.expires_at - self.issued_at) * fraction

    @classmethod
    def parse(cls, value: str) -> DeviceToken:
        """Read ``iat``/``exp`` back from the token's claims (not verified: we just made it)."""
        try:
            payload = value.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return cls(value, float(claims["iat"]), float(claims["exp"]))
        except (IndexError, ValueError, KeyError, TypeError):
            msg = "the token signer returned something that is not a device token"
            raise TokenSigningError(msg) from None


def _sign(
    cred_dir: Path,
    device_id: str,
    ttl: int,
    tcti: str | None,
    pair: tuple[Path, Path] | None = None,
    audience: str | None = None,
) -> str:
    from provisioning.tokens import token_for_credentials

    cert_file, key_file = pair if pair is not None else (None, None)
    token, _claims = token_for_credentials(
        cred_dir,
        device_id,
        ttl=ttl,
        tcti=tcti,
        cert_file=cert_file,
        key_file=key_file,
        audience=audience,
    )
    return token


def make_token(
    cred_dir: Path,
    device_id: str,
    *,
    ttl: int,
    tcti: str | None = None,
    timeout: float = TOKEN_TIMEOUT,
    pair: tuple[Path, Path] | None = None,
    audience: str | None = None,
) -> DeviceToken:
    """A fresh token for the device of ``cred_dir``; TokenSigningError with the reason.

    ``pair`` (certificate file, key file): sign with that pair instead of the directory's own
    (a renewal candidate, tried before it is installed). ``audience``: the ``aud`` claim (None:
    the trust domain), for a broker run with ``--token-audience``."""
    if "cryptography" in sys.modules or not sys.executable:
        try:
            return DeviceToken.parse(_sign(cred_dir, device_id, ttl, tcti, pair, audience))
        except (OSError, ValueError, ProvisioningError) as exc:  # TokenError among them
            raise TokenSigningError(f"cannot sign a device token: {exc}") from None
    argv = [sys.executable, "-c", _CHILD, str(cred_dir), device_id, f"--ttl={ttl}"]
    if tcti is not None:
        argv.append(f"--tpm={tcti}")
    if pair is not None:
        argv += [f"--cert={pair[0]}", f"--key={pair[1]}"]
    if audience is not None:
        argv.append(f"--audience={audience}")
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        msg = f"signing the device token did not finish within {timeout:g} s"
        raise TokenSigningError(msg) from None
    except OSError as exc:
        msg = f"cannot start the token signer ({sys.executable}): {exc}"
        raise TokenSigningError(msg) from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.decode(errors="replace").splitlines()]
        reason = next((line for line in reversed(lines) if line), "no reason given")
        msg = f"signing the device token failed (exit status {proc.returncode}): {reason}"
        raise TokenSigningError(msg)
    return DeviceToken.parse(proc.stdout.decode("ascii", errors="replace").strip())


def main(argv: Sequence[str] | None = None) -> int:
    """The child: print a token for ``CRED_DIR``'s device; exit 1 with one stderr line."""
    parser = argparse.ArgumentParser(prog="device_agent.token")
    parser.add_argument("cred_dir", type=Path)
    parser.add_argument("device_id")
    parser.add_argument("--ttl", type=int, required=True)
    parser.add_argument("--tpm", dest="tcti", default=None, help="TSS2 TCTI of the TPM")
    parser.add_argument("--cert", type=Path, default=None, help="another certificate file")
    parser.add_argument("--key", type=Path, default=None, help="its key file")
    parser.add_argument("--audience", default=None, help="the aud claim (default: trust domain)")
    args = parser.parse_args(argv)
    pair = (args.cert, args.key) if args.cert is not None and args.key is not None else None
    try:
        token = _sign(args.cred_dir, args.device_id, args.ttl, args.tcti, pair, args.audience)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the parent reads one line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {reason}", file=sys.stderr)
        return 1
    print(token)
    return 0
