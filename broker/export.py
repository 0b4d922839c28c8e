"""``iotauth broker export``: the same PKI, registry and policy, for Mosquitto or EMQX.

This module holds what both formats share: the inventory read from a PKI directory (certificates,
CRL, the identities the registry knows), the notes an export produces (what was narrowed and why),
filter overlap, and writing the export directory with its manifest ``iotauth-export.json``. The
manifest is what ``iotauth device revoke --export DIR`` (``provisioning.export_hook``) reads to
find the CRL file, the broker's pid file and the kick channel, so it is a small contract:

    {"format": "mosquitto" | "emqx", "trust_domain": ..., "issuing_sha256": ...,
     "crl": "crl.pem", "pid_file": "/abs/mosquitto.pid" | null,
     "kick": {"method": "mosquitto-dynsec", "socket": ..., "username": ...,
              "password_file": "private/admin.password"} | null}

The rule every translation obeys: an exported broker may grant **less** than our policy, never
more. Whatever is lost is reported as a :class:`Note` (a warning names the rule and the filter).

Methods: both targets get the mutual-TLS listener only. The listeners asked for (``--listen``, as
given to ``broker run``) say which other methods the user wants; each target names why it cannot
enforce them exactly (``UNSUPPORTED_METHODS`` in its module), and :func:`method_notes` turns that
into one warning per identity and method. Nothing else is written for them, so an identity whose
only credential is a secret or a token cannot connect to the exported broker at all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import BrokerError
from broker.policy import Policy, Rule
from broker.settings import METHODS, ListenerSpec
from provisioning.certificates import fingerprint
from provisioning.identity import IdentityKind
from provisioning.keyfiles import (
    PRIVATE_DIR_MODE,
    StagedDirectory,
    atomic_write,
    load_private_key,
    private_key_pem,
)
from provisioning.pki import PKI
from provisioning.registry import CertRecord

__all__ = [
    "FORMATS",
    "MANIFEST",
    "ExportError",
    "ExportFile",
    "ExportResult",
    "Inventory",
    "Note",
    "active_identities",
    "export",
    "load_inventory",
    "method_notes",
    "overlaps",
    "render_filter",
    "write_export",
]

MANIFEST = "iotauth-export.json"
FORMATS = ("mosquitto", "emqx")


class ExportError(BrokerError):
    """An export that cannot be made (or, with ``strict``, would be narrower than the policy)."""


@dataclass(frozen=True, slots=True)
class Note:
    """Something the user must know about an export. ``warning`` means rights were narrowed."""

    level: str  # "warning" | "info"
    message: str
    rule: str | None = None
    # The identity and method a note about authentication methods is for (method_notes).
    identity: str | None = None
    method: str | None = None

    def __str__(self) -> str:
        where = f"rule {self.rule!r}: " if self.rule else ""
        return f"{self.level}: {where}{self.message}"

    def to_json(self) -> dict[str, str | None]:
        return {
            "level": self.level,
            "message": self.message,
            "rule": self.rule,
            "identity": self.identity,
            "method": self.method,
        }


@dataclass(frozen=True, slots=True)
class ExportFile:
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Inventory:
    """What an export needs from a PKI directory, read once."""

    pki_dir: Path
    trust_domain: str
    root_pem: bytes
    issuing_pem: bytes
    issuing_sha256: str
    server_chain_pem: bytes
    server_key_pem: bytes
    crl_pem: bytes
    crl_number: int
    devices: tuple[str, ...]  # active device ids
    services: tuple[str, ...]  # active service names (with an active certificate)
    notes: tuple[Note, ...] = ()
    secrets: tuple[str, ...] = ()  # services with an active secret, certificate or not
    registered: tuple[str, ...] = ()  # services registered by name alone (oidc only)

    def names(self, kind: str) -> tuple[str, ...]:
        return self.devices if kind == IdentityKind.DEVICE.value else self.services


@dataclass(slots=True)
class ExportResult:
    format: str
    out: Path
    notes: list[Note] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def narrowed(self) -> bool:
        return any(n.level == "warning" for n in self.notes)


def load_inventory(pki_dir: Path, *, passphrase: bytes | None = None) -> Inventory:
    """Read certificates, key, CRL and the active identities; refuse a name held by two kinds."""
    with PKI.open(pki_dir, passphrase=passphrase) as pki:
        info = pki.crl_info()
        devices, services, notes = active_identities(pki.registry.all())
        states = pki.registry.secret_states()
        secrets = tuple(sorted(n for n, (_, status) in states.items() if status == "active"))
        registered = tuple(
            sorted(n for n, s in pki.registry.registration_states().items() if s == "active")
        )
        key_path = pki_dir / "private" / "server.key"
        key_pem = key_path.read_bytes()
        if b"ENCRYPTED" in key_pem.split(b"\n", 1)[0]:
            key_pem = private_key_pem(load_private_key(key_path, passphrase))
            notes.append(
                Note(
                    "info",
                    "private/server.key is encrypted; the export holds it decrypted (mode 0600), "
                    "because a broker must read it unattended",
                )
            )
        return Inventory(
            pki_dir=pki_dir,
            trust_domain=pki.trust_domain,
            root_pem=(pki_dir / "root.crt").read_bytes(),
            issuing_pem=(pki_dir / "issuing.crt").read_bytes(),
            issuing_sha256=fingerprint(pki.issuing),
            server_chain_pem=(pki_dir / "server.crt").read_bytes(),
            server_key_pem=key_pem,
            crl_pem=(pki_dir / "crl.pem").read_bytes(),
            crl_number=info.number,
            devices=devices,
            services=services,
            notes=tuple(notes),
            secrets=secrets,
            registered=registered,
        )


def active_identities(
    records: Iterable[CertRecord],
) -> tuple[tuple[str, ...], tuple[str, ...], list[Note]]:
    """Active device ids and service names; refuse a name that is active as both kinds.

    The registry already forbids that (one active certificate per name); this is the export's own
    check, because Mosquitto and EMQX tell identities apart by CN alone.
    """
    notes: list[Note] = []
    active: dict[str, set[str]] = {}
    history: dict[str, set[str]] = {}
    for record in records:
        history.setdefault(record.name, set()).add(record.kind)
        if record.state() == "active":
            active.setdefault(record.name, set()).add(record.kind)
    both = sorted(name for name, kinds in active.items() if len(kinds) > 1)
    if both:
        msg = (
            f"the registry holds an active device and an active service both named "
            f"{both[0]!r}; Mosquitto and EMQX know only the certificate's CN, so one "
            "could use the other's rights. Revoke one of them before exporting"
        )
        raise ExportError(msg)
    for name in sorted(n for n, kinds in history.items() if len(kinds) > 1):
        notes.append(
            Note(
                "info",
                f"the name {name!r} has been both a device and a service; an export made "
                "before the change still gives that CN the old kind's rights: replace it "
                "with this one",
            )
        )
    devices = tuple(sorted(n for n, k in active.items() if k == {"device"}))
    services = tuple(sorted(n for n, k in active.items() if k == {"service"}))
    return devices, services, notes


def render_filter(template: str, trust_domain: str, name: str) -> str:
    """A policy template with the identity substituted (``name`` may be a broker placeholder)."""
    return template.format_map({"name": name, "device_id": name, "trust_domain": trust_domain})


def overlaps(a: str, b: str) -> bool:
    """Is there a topic name that both (valid) filters match? MQTT 3.1.1 section 4.7 rules."""
    a_levels, b_levels = a.split("/"), b.split("/")
    if (a_levels[0] in ("+", "#") and b_levels[0].startswith("$")) or (
        b_levels[0] in ("+", "#") and a_levels[0].startswith("$")
    ):
        return False  # a leading wildcard never matches a '$' topic
    for index in range(max(len(a_levels), len(b_levels)) + 1):
        x = a_levels[index] if index < len(a_levels) else None
        y = b_levels[index] if index < len(b_levels) else None
        if x == "#" or y == "#":
            return True  # '#' takes the rest, and the parent level too
        if x is None or y is None:
            return x is None and y is None
        if "+" not in (x, y) and x != y:
            return False
    return True  # pragma: no cover - the loop always returns


def rules_for(policy: Policy, kind: str) -> list[Rule]:
    return [r for r in policy.rules if r.kind == kind]


def export(
    policy: Policy,
    inventory: Inventory,
    out: Path,
    *,
    fmt: str,
    strict: bool = False,
    options: Mapping[str, object] | None = None,
    listeners: Iterable[ListenerSpec] = (),
) -> ExportResult:
    """Translate and write. ``strict`` refuses instead of narrowing.

    ``listeners`` (as ``broker run --listen`` takes them; none: one mTLS listener) says which
    methods the exported broker should serve; the mTLS one gives the listener's port, and every
    other method is reported per identity (:func:`method_notes`).
    """
    if fmt == "mosquitto":
        from broker.export_mosquitto import UNSUPPORTED_METHODS as UNSUPPORTED
        from broker.export_mosquitto import build_mosquitto as build
    elif fmt == "emqx":
        from broker.export_emqx import UNSUPPORTED_METHODS as UNSUPPORTED
        from broker.export_emqx import build_emqx as build
    else:
        msg = f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}"
        raise ExportError(msg)
    opts = dict(options or {})
    listeners = tuple(listeners)
    if listeners:
        mtls = [spec for spec in listeners if "mtls" in spec.methods]
        if len(mtls) != 1:
            msg = (
                f"the {fmt} export writes one mutual-TLS listener (the one method it enforces "
                f"exactly): list mtls on exactly one --listen (got {len(mtls)})"
            )
            raise ExportError(msg)
        if mtls[0].port == 0:
            msg = f"--listen {mtls[0]}: an exported broker needs a fixed port, not 0 (any free one)"
            raise ExportError(msg)
        opts["port"] = mtls[0].port
    out = out.resolve()
    files, manifest, notes = build(policy, inventory, out, opts)
    methods = method_notes(inventory, listeners, fmt, UNSUPPORTED)
    notes = [*inventory.notes, *notes, *methods]
    if methods and "README.md" in files:
        lines = "".join(f"- {n}\n" for n in methods)
        section = (
            "\n## Authentication methods not exported\n\n"
            f"This broker takes client certificates (mtls) only.\n\n{lines}"
        )
        files["README.md"] = ExportFile(files["README.md"].data + section.encode())
    result = ExportResult(fmt, out, notes)
    if strict and result.narrowed:
        first = next(n for n in notes if n.level == "warning")
        msg = f"--strict: the {fmt} export would be narrower than the policy ({first})"
        raise ExportError(msg)
    manifest = {
        "format": fmt,
        "generator": "iotauth broker export",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trust_domain": inventory.trust_domain,
        "issuing_sha256": inventory.issuing_sha256,
        "crl_number": inventory.crl_number,
        "policy": policy.source,
        **manifest,
    }
    files[MANIFEST] = ExportFile((json.dumps(manifest, indent=2) + "\n").encode())
    result.files = sorted(files)
    write_export(out, files, fmt=fmt)
    return result


def method_notes(
    inventory: Inventory,
    listeners: Iterable[ListenerSpec],
    fmt: str,
    unsupported: Mapping[str, str],
) -> list[Note]:
    """One warning per identity and method that the listeners ask for and ``fmt`` cannot enforce.

    ``unsupported`` maps each such method to the target's reason. What an identity is left with
    is said too: its certificate, or nothing (a secret-only service cannot connect at all; the
    export never lets anyone in without a check it can make).
    """
    asked = {m for spec in listeners for m in spec.methods} or {"mtls"}
    certified = set(inventory.services)
    holders = {
        "jwt": [("device", d) for d in inventory.devices],
        "password": [("service", s) for s in inventory.secrets],
        "scram": [("service", s) for s in inventory.secrets],
        "oidc": [
            ("service", s)
            for s in sorted(certified | set(inventory.secrets) | set(inventory.registered))
        ],
    }
    notes: list[Note] = []
    for method in METHODS:
        if method not in asked or method not in unsupported:
            continue
        who = holders.get(method, [])
        if not who:
            notes.append(
                Note("info", f"{method} is not exported to {fmt} ({unsupported[method]})", None)
            )
        for kind, name in who:
            left = (
                "it can connect with its certificate only"
                if kind == "device" or name in certified
                else "it has no certificate, so it cannot connect to the exported broker at all"
            )
            notes.append(
                Note(
                    "warning",
                    f"{kind} {name!r}: {method} is not exported to {fmt}: "
                    f"{unsupported[method]}; {left}",
                    identity=name,
                    method=method,
                )
            )
    secret_only = sorted(set(inventory.secrets) - certified)
    registered_only = sorted(set(inventory.registered) - certified - set(inventory.secrets))
    if not asked & {"password", "scram", "oidc"}:
        no_cert = [(name, "a secret") for name in secret_only]
        no_cert += [(name, "a registration by name") for name in registered_only]
        notes += [
            Note(
                "info",
                f"service {name!r} has {held} but no certificate: not exported, and it cannot "
                "connect to the exported broker (no --listen lists password, scram or oidc, as "
                "with 'broker run' by default)",
                identity=name,
            )
            for name, held in sorted(no_cert)
        ]
    return notes


def write_export(
    out: Path,
    files: Mapping[str, ExportFile],
    *,
    fmt: str,
    keep: Callable[[str], bool] = lambda _: False,
) -> None:
    """Write a new export directory in one rename, or refresh an earlier export of ``fmt``.

    An existing directory is overwritten only if it holds our manifest of the same format; each
    file is then replaced atomically, so a running broker never reads half a file. ``keep`` names
    files that a refresh leaves alone when present (state the broker itself maintains).
    """
    subdirs = sorted({Path(name).parent for name in files if Path(name).parent != Path()})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        try:
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            msg = f"{out} exists and is not an iotauth export; choose a new --out directory"
            raise ExportError(msg) from None
        if old.get("format") != fmt:
            msg = f"{out} holds a {old.get('format')} export; choose another --out for {fmt}"
            raise ExportError(msg)
        for sub in subdirs:
            (out / sub).mkdir(
                mode=PRIVATE_DIR_MODE if sub.name == "private" else 0o755, exist_ok=True
            )
        for name, item in files.items():
            if keep(name) and (out / name).exists():
                continue
            atomic_write(out / name, item.data, mode=item.mode)
        return
    staged = StagedDirectory(out)
    try:
        for sub in subdirs:
            (staged.path / sub).mkdir(mode=PRIVATE_DIR_MODE if sub.name == "private" else 0o755)
        for name, item in files.items():
            staged.write(name, item.data, mode=item.mode)
        os.chmod(staged.path, 0o755)  # noqa: S103 - the broker's user reads it; keys are 0600
        staged.commit()
    except BaseException:
        staged.discard()
        raise
