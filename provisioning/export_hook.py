"""Revocation reaches an exported broker: ``iotauth device revoke ... --export DIR [--reload]``.

``iotauth broker export`` writes a directory for Mosquitto or EMQX with a manifest,
``iotauth-export.json``, that says where its CRL file is, where the broker writes its pid, and
how to close live sessions (the "kick channel"). This module reads only that manifest (the
provisioning package may not import the broker), so the steps are:

1. check the directory was exported from *this* PKI (trust domain and issuing CA fingerprint);
2. verify the new CRL's signature and refuse to roll the exported CRL back to a lower number;
3. replace the exported CRL atomically (:func:`provisioning.keyfiles.atomic_write`);
4. with ``reload``: SIGHUP to the pid in the pid file (Mosquitto re-reads ``crlfile`` and
   refuses new handshakes of the revoked certificate), then, because Mosquitto keeps sessions
   that are already connected, close them through the dynamic-security plugin:
   ``mosquitto_ctrl dynsec createClient/disableClient/deleteClient NAME`` on the local socket
   (``disableClient`` disconnects every session of that user name, which is the certificate CN).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioning.certificates import fingerprint
from provisioning.errors import ProvisioningError
from provisioning.keyfiles import atomic_write
from provisioning.pki import PKI

__all__ = ["MANIFEST", "ExportHookError", "HookReport", "publish_crl"]

MANIFEST = "iotauth-export.json"
RELOAD_SETTLE_S = 0.3  # Mosquitto handles SIGHUP in its next loop turn; kick after the reload


class ExportHookError(ProvisioningError):
    """The export directory cannot be updated or its broker cannot be signalled."""


@dataclass(slots=True)
class HookReport:
    crl_path: Path
    crl_number: int
    reloaded_pid: int | None = None
    kicked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _manifest(export_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((export_dir / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{export_dir} is not an iotauth export (no {MANIFEST}); run 'iotauth broker export'"
        raise ExportHookError(msg) from None
    except (OSError, ValueError) as exc:
        msg = f"{export_dir / MANIFEST} is unreadable: {exc}"
        raise ExportHookError(msg) from None
    if not isinstance(doc, dict) or doc.get("format") not in ("mosquitto", "emqx"):
        msg = f"{export_dir / MANIFEST} is not an iotauth export manifest"
        raise ExportHookError(msg)
    return doc


def _crl_number(data: bytes, where: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError:
        msg = f"{where} is not a PEM CRL"
        raise ExportHookError(msg) from None


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def publish_crl(
    export_dir: Path,
    pki: PKI,
    *,
    reload: bool = False,
    names: Sequence[str] = (),
    settle: float = RELOAD_SETTLE_S,
) -> HookReport:
    """Copy the PKI's CRL into the export and, with ``reload``, make the broker apply it."""
    doc = _manifest(export_dir)
    if doc.get("trust_domain") != pki.trust_domain or doc.get("issuing_sha256") != fingerprint(
        pki.issuing
    ):
        msg = f"{export_dir} was exported from another PKI, not {pki.path}"
        raise ExportHookError(msg)
    target = (export_dir / str(doc.get("crl", "crl.pem"))).resolve()
    if export_dir.resolve() not in target.parents:
        msg = f"{export_dir / MANIFEST}: the CRL path leaves the export directory"
        raise ExportHookError(msg)
    source = pki.path / "crl.pem"
    new = _crl_number(source.read_bytes(), source)
    if not new.is_signature_valid(pki.issuing.public_key()):  # type: ignore[arg-type]
        msg = f"{source} is not signed by this PKI's issuing CA"
        raise ExportHookError(msg)
    if target.exists():
        old = _crl_number(target.read_bytes(), target)
        if _number(old) > _number(new):
            msg = (
                f"{target} holds CRL #{_number(old)}, newer than {source} (#{_number(new)}); "
                "refusing to roll it back"
            )
            raise ExportHookError(msg)
    atomic_write(target, source.read_bytes(), mode=0o644)
    report = HookReport(target, _number(new))
    if not reload:
        return report
    if doc["format"] != "mosquitto" or not doc.get("pid_file"):
        msg = (
            f"{export_dir} is an {doc['format']} export: EMQX is not reloaded by signal "
            "(see its README.md: ban and kick through the EMQX API)"
        )
        raise ExportHookError(msg)
    report.reloaded_pid = _sighup(Path(str(doc["pid_file"])))
    kick = doc.get("kick")
    if not names:
        return report
    if not isinstance(kick, dict):
        report.notes.append(
            "this export has no kick channel: Mosquitto keeps sessions that are already "
            f"connected, so {', '.join(names)} stays connected until Mosquitto restarts"
        )
        return report
    time.sleep(settle)
    for name in names:
        _kick(export_dir, kick, name)
        report.kicked.append(name)
    return report


def _sighup(pid_file: Path) -> int:
    try:
        pid = int(pid_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        msg = f"cannot read the Mosquitto pid from {pid_file}; is Mosquitto running this export?"
        raise ExportHookError(msg) from None
    comm = Path(f"/proc/{pid}/comm")
    try:
        name = comm.read_text(encoding="utf-8").strip() if comm.parent.exists() else "mosquitto"
    except OSError:
        name = ""
    if "mosquitto" not in name:
        msg = f"pid {pid} from {pid_file} is not a running mosquitto; the CRL was copied only"
        raise ExportHookError(msg)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        msg = f"Mosquitto (pid {pid} from {pid_file}) is not running; the CRL was copied only"
        raise ExportHookError(msg) from None
    return pid


def _kick(export_dir: Path, kick: dict[str, Any], name: str) -> None:
    """Close every live session of user ``name`` through the dynamic-security plugin."""
    ctrl = shutil.which("mosquitto_ctrl")
    if ctrl is None:
        msg = "mosquitto_ctrl is not installed: cannot close the revoked identity's live sessions"
        raise ExportHookError(msg)
    if kick.get("method") != "mosquitto-dynsec":
        msg = f"unknown kick method {kick.get('method')!r} in {export_dir / MANIFEST}"
        raise ExportHookError(msg)
    password = (export_dir / str(kick["password_file"])).read_text(encoding="utf-8").strip()
    base = [
        ctrl,
        "--unix",
        str(kick["socket"]),
        "-u",
        str(kick["username"]),
        "-P",
        password,
        "dynsec",
    ]

    def run(*args: str) -> tuple[bool, str]:
        proc = subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=15, check=False
        )
        text = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0 and "Error" not in text, text

    # disableClient needs a dynsec client of that name: a throwaway one (random password, only
    # on the local socket) that is deleted right after. Certificate users never use it.
    run("createClient", name, "-p", secrets.token_urlsafe(24))
    ok, text = run("disableClient", name)
    run("deleteClient", name)
    if not ok:
        last = text.splitlines()[-1] if text else "no output"
        msg = f"could not close the live sessions of {name!r} via mosquitto_ctrl: {last}"
        raise ExportHookError(msg)
