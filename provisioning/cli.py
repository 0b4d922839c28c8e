"""``iotauth ca|device|service|ledger``: the station's PKI commands.

Mounted by :mod:`iotauth.cli`. Every command turns a ProvisioningError or an OSError into one line
on stderr and exit status 1; nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from provisioning.errors import LedgerCorruptError, ProvisioningError
from provisioning.identity import Identity, IdentityKind, validate_name, validate_trust_domain
from provisioning.pki import PKI, REVOCATION_REASONS, Issued, open_root, passphrase_from_env
from provisioning.registry import CertRecord, RegistrationRecord, SecretRecord
from provisioning.service_secrets import service_methods

__all__ = [
    "ca_app",
    "device_app",
    "ledger_app",
    "plural",
    "print_json",
    "service_app",
    "user_errors",
]

# Piped output (logs, CI, tests) gets room for a whole table row instead of rich's 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(
    stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160
)

ca_app = typer.Typer(help="Create and maintain the fleet CA.", no_args_is_help=True)
device_app = typer.Typer(
    help="Issue, list, inspect and revoke device identities.", no_args_is_help=True
)
service_app = typer.Typer(help="Backend (service) identities.", no_args_is_help=True)
ledger_app = typer.Typer(help="The tamper-evident manufacturing ledger.", no_args_is_help=True)

PkiOpt = Annotated[
    Path,
    typer.Option(
        "--pki", envvar="IOTAUTH_PKI", help="PKI directory (env IOTAUTH_PKI).", show_default=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line and exit 1 for anything the user can fix; never a traceback."""
    try:
        yield
    except ProvisioningError as exc:
        # escape: a message may hold brackets (pip extras, paths) that rich would take as markup
        err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"[red]error:[/red] {escape(f'{exc.strerror or exc}{where}')}", markup=True)
        raise typer.Exit(1) from None


def _open(pki: Path) -> PKI:
    return PKI.open(pki, passphrase=passphrase_from_env())


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def print_json(doc: object) -> None:
    """Every --json document (docs/JSON.md): one JSON value on stdout, keys sorted."""
    print(json.dumps(doc, indent=2, sort_keys=True))


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 device``, ``2 devices``, ``0 entries`` (give ``many`` when adding 's' is wrong)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


# -- ca ----------------------------------------------------------------------------------------


@ca_app.command("init")
def ca_init(
    pki: PkiOpt,
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="SPIFFE trust domain, e.g. fleet.example.")
    ],
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="Extra broker host name or IP (repeat)."),
    ] = None,
    device_days: Annotated[int, typer.Option(help="Default device certificate lifetime.")] = 90,
    issuing_key: Annotated[
        str | None,
        typer.Option(
            "--issuing-key",
            help="Make the issuing CA key in a PKCS#11 token: 'pkcs11:token=LABEL;object=NAME' "
            "(module: ?module-path= or IOTAUTH_PKCS11_MODULE; PIN: IOTAUTH_PKCS11_PIN).",
        ),
    ] = None,
    root_key: Annotated[
        str | None,
        typer.Option(
            "--root-key",
            help="Make the root CA key in a PKCS#11 token (same form); with --root-cert, where "
            "that root's existing key is (a PEM file or a pkcs11: URI).",
        ),
    ] = None,
    root_cert: Annotated[
        Path | None,
        typer.Option(
            "--root-cert",
            help="Keep this existing root (e.g. OLD/root.crt) and give it a new issuing CA: the "
            "way back after losing the issuing CA's token (docs/HSM.md). Needs --root-key.",
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Shared registry postgresql://USER@HOST[:PORT]/DB (password: PGPASSWORD or "
            "~/.pgpass, never here). Default: registry.sqlite3 in the PKI directory.",
        ),
    ] = None,
    station: Annotated[
        str, typer.Option("--station", help="With --registry: this directory's station name.")
    ] = "main",
    as_json: JsonOpt = False,
) -> None:
    """Create root CA, issuing CA, broker certificate, registry, ledger and CRL."""
    with user_errors(), contextlib.ExitStack() as stack:
        validate_trust_domain(trust_domain)
        if device_days <= 0:
            msg = f"--device-days must be at least 1, not {device_days}"
            raise ProvisioningError(msg)
        passphrase = passphrase_from_env()
        existing_root = None
        if root_cert is not None:
            if root_key is None:
                msg = "--root-cert needs --root-key: the root's key file or pkcs11: URI"
                raise ProvisioningError(msg)
            existing_root = open_root(root_cert, root_key, passphrase)
            stack.callback(existing_root[1].close)
        ca = PKI.init(
            pki,
            trust_domain=trust_domain,
            server_names=server_name or [],
            passphrase=passphrase,
            device_days=device_days,
            issuing_key=issuing_key,
            root_key=None if root_cert else root_key,
            existing_root=existing_root,
            registry=registry,
            station=station,
        )
        with ca:
            if as_json:
                print_json(
                    {
                        "trust_domain": trust_domain,
                        "pki": str(pki),
                        "root": _cert_json(ca.root),
                        "issuing": _cert_json(ca.issuing),
                        "server_names": ["localhost", "127.0.0.1", *(server_name or [])],
                        "encrypted_keys": bool(passphrase),
                        **({"registry": ca.registry.where, "station": station} if registry else {}),
                        "warnings": [],
                    }
                )
                return
            out.print(f"Created the PKI of [bold]{trust_domain}[/bold] in {pki}", markup=True)
            if registry:
                where = ca.registry.where
                out.print(f"  registry    {where} (station {station!r}; ledger in the database)")
            for label, cert in (("root CA    ", ca.root), ("issuing CA ", ca.issuing)):
                subject = cert.subject.rfc4514_string()
                out.print(f"  {label} {subject}  (until {_when(cert.not_valid_after_utc)})")
            out.print(
                f"  server cert localhost, 127.0.0.1{''.join(', ' + n for n in server_name or [])}"
            )
            out.print(
                f"  keys        {pki / 'private'} ({'encrypted' if passphrase else 'unencrypted'})"
            )
            tokens = (("root key   ", ca.config.root_key), ("issuing key", ca.config.issuing_key))
            for label, uri in tokens:
                if uri:
                    out.print(f"  {label} {uri} (in the token, not extractable)")
            if root_cert:
                out.print(f"  root kept from {root_cert}; its key was used once, not stored")
            elif not root_key:
                out.print(
                    f"Move {pki / 'private' / 'root.key'} offline: issuing and revoking need only "
                    "the issuing CA."
                )


@ca_app.command("add-station")
def ca_add_station(
    name: Annotated[str, typer.Argument(help="Station name: 1-64 of a-z, 0-9, '-'.")],
    pki: PkiOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="Station directory to create.")],
    server_name: Annotated[
        list[str] | None,
        typer.Option("--server-name", help="Extra broker host name or IP (repeat)."),
    ] = None,
    issuing_key: Annotated[
        str | None,
        typer.Option(
            "--issuing-key",
            help="Make the station's issuing CA key in a PKCS#11 token: "
            "'pkcs11:token=LABEL;object=NAME' (as for 'ca init').",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A station (or broker) directory with its own issuing CA, signed by the root in --pki."""
    with user_errors(), _open(pki) as ca:
        ca.add_station(name, out=out_dir, server_names=server_name or [], issuing_key=issuing_key)
        with _open(out_dir) as station:
            issuing = station.issuing
            doc = {
                "station": name,
                "out": str(out_dir),
                "issuing": station.issuer_fingerprint,
                "subject": issuing.subject.rfc4514_string(),
                "registry": station.registry.where,
                "warnings": [],
            }
        if as_json:
            print_json(doc)
            return
        out.print(f"Added station [bold]{name}[/bold] in {out_dir}", markup=True)
        out.print(f"  issuing CA  {doc['subject']} (signed by the root)")
        out.print(f"  registry    {doc['registry']}")
        out.print(f"Copy {out_dir} to the station's PC; it holds no root key.")


@ca_app.command("revoke-station")
def ca_revoke_station(
    name: Annotated[str, typer.Argument(help="Station name.")],
    pki: PkiOpt,
    reason: Annotated[
        str, typer.Option("--reason", help=f"One of: {', '.join(REVOCATION_REASONS)}.")
    ] = "unspecified",
    as_json: JsonOpt = False,
) -> None:
    """Revoke a station's issuing CA: every broker refuses all of its certificates."""
    with user_errors(), _open(pki) as ca:
        st = ca.revoke_station(name, reason=reason)
        if as_json:
            print_json({"station": name, "issuing": st.fingerprint, "reason": reason})
            return
        out.print(f"Revoked station {name} (issuing CA {st.fingerprint[:16]}, {reason})")


@ca_app.command("stations")
def ca_stations(pki: PkiOpt, as_json: JsonOpt = False) -> None:
    """The stations of the shared registry: issuing CA, CRL number, status."""
    with user_errors(), _open(pki) as ca:
        stations = ca.stations()
        if not ca.registry.shared:
            msg = f"{pki} uses a local registry (no stations); see 'ca init --registry'"
            raise ProvisioningError(msg)
    docs = [
        {
            "name": st.name,
            "issuing": st.fingerprint,
            "crl_number": st.crl_number,
            "status": st.status,
            "added_at": st.added_at.isoformat(),
        }
        for st in stations
    ]
    if as_json:
        print_json(docs)
        return
    for d in docs:
        out.print(
            f"{d['name']:<24} {d['status']:<8} CRL #{d['crl_number']:<5} {str(d['issuing'])[:16]}"
        )


@ca_app.command("crl")
def ca_crl(pki: PkiOpt, as_json: JsonOpt = False) -> None:
    """Re-sign the CRL with a new number and nextUpdate (schedule this before it goes stale)."""
    with user_errors(), _open(pki) as ca:
        info = ca.refresh_crl()
        if as_json:
            print_json(
                {
                    "crl": {
                        "number": info.number,
                        "path": str(pki / "crl.pem"),
                        "this_update": info.this_update.isoformat(),
                        "next_update": info.next_update.isoformat(),
                        "revoked": info.revoked,
                    },
                    "warnings": [],
                }
            )
            return
        out.print(
            f"CRL #{info.number} written to {pki / 'crl.pem'}: {info.revoked} revoked, "
            f"next update {_when(info.next_update)}"
        )


@ca_app.command("show")
def ca_show(pki: PkiOpt, as_json: JsonOpt = False) -> None:
    """Trust domain, CA validity, CRL freshness and counts."""
    with user_errors(), _open(pki) as ca:
        info = ca.crl_info()
        now = dt.datetime.now(dt.UTC)
        warn_at = info.next_update - dt.timedelta(hours=ca.config.crl_warn_hours)
        records = ca.registry.latest()
        devices = sum(1 for r in records if r.kind == "device" and r.state() == "active")
        services = sum(1 for r in records if r.kind == "service" and r.state() == "active")
        doc = {
            "trust_domain": ca.trust_domain,
            "root": _cert_json(ca.root),
            "issuing": _cert_json(ca.issuing),
            "root_key_online": (pki / "private" / "root.key").exists(),
            "issuing_key": ca.config.issuing_key or str(pki / "private" / "issuing.key"),
            "root_key": ca.config.root_key,
            "crl": {
                "number": info.number,
                "this_update": info.this_update.isoformat(),
                "next_update": info.next_update.isoformat(),
                "revoked": info.revoked,
                "stale": info.stale(),
            },
            "devices": devices,
            "services": services,
        }
        if ca.registry.shared:
            doc["registry"] = ca.registry.where
            doc["station"] = ca.config.station
        if as_json:
            print_json(doc)
            return
        out.print(f"trust domain  {ca.trust_domain}")
        online = "online" if doc["root_key_online"] else "offline"
        if ca.config.root_key:
            online = ca.config.root_key  # in a token: where, not whether
        out.print(f"root CA       until {_when(ca.root.not_valid_after_utc)}; key {online}")
        out.print(
            f"issuing CA    until {_when(ca.issuing.not_valid_after_utc)}; key {doc['issuing_key']}"
        )
        crl_line = f"#{info.number}, {info.revoked} revoked, next update {_when(info.next_update)}"
        out.print(f"CRL           {crl_line}")
        out.print(f"active        {plural(devices, 'device')}, {plural(services, 'service')}")
        if ca.registry.shared:
            out.print(f"registry      {doc['registry']} (station {doc['station']})")
        if info.stale(now):
            err.print("[red]warning:[/red] the CRL is stale; run 'iotauth ca crl'", markup=True)
        elif now >= warn_at:
            err.print(
                "[yellow]warning:[/yellow] the CRL goes stale soon; run 'iotauth ca crl'",
                markup=True,
            )


# -- device and service ------------------------------------------------------------------------


def _issue(
    kind: IdentityKind,
    name: str,
    pki: Path,
    out_dir: Path | None,
    csr: Path | None,
    rotate: bool,
    hardware_serial: str | None,
    broker: str | None,
    days: int | None,
    as_json: bool,
) -> None:
    with user_errors():
        validate_name(name, what="device id" if kind is IdentityKind.DEVICE else "service name")
        if out_dir is None and csr is None:
            msg = "--out is required unless --csr is given (then the certificate goes to stdout)"
            raise ProvisioningError(msg)
        csr_bytes = csr.read_bytes() if csr else None
        with _open(pki) as ca:
            asked = ca.lifetime_days(kind, days)  # refuses 0 and negatives before any work
            issued = ca.issue(
                name,
                kind=kind,
                csr=csr_bytes,
                out=out_dir,
                rotate=rotate,
                hardware_serial=hardware_serial,
                broker=broker,
                days=days,
            )
        warnings = _validity_warnings(issued, asked)
        for warning in warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(warning)}", markup=True)
        if as_json:
            doc = issued.record.to_json()
            doc["out"] = str(out_dir) if out_dir else None
            doc["days_requested"] = asked
            doc["warnings"] = warnings
            print_json(doc)
        elif out_dir is None:
            os.write(1, issued.cert_chain_pem)
        else:
            r = issued.record
            out.print(
                f"Issued {kind.value} [bold]{name}[/bold] ({issued.identity.spiffe_id})",
                markup=True,
            )
            out.print(f"  serial {r.serial}, valid until {_when(r.not_after)}")
            key_note = (
                "key generated here" if r.key_origin == "station" else "key stays on the device"
            )
            out.print(f"  credentials in {out_dir} ({key_note})")


def _validity_warnings(issued: Issued, asked: int) -> list[str]:
    """A certificate never outlives its issuer: say so when that cut the validity asked for."""
    cert, issuer = issued.certificate, issued.issuing
    if cert.not_valid_after_utc < issuer.not_valid_after_utc:
        return []
    got = (cert.not_valid_after_utc - issued.record.issued_at).days
    return [
        f"the certificate is valid for {got} days, not the {asked} asked: the issuing CA "
        f"expires {_when(issuer.not_valid_after_utc)}"
    ]


OutOpt = Annotated[
    Path | None, typer.Option("--out", help="Credential directory to create (must not exist).")
]
CsrOpt = Annotated[
    Path | None, typer.Option("--csr", help="Issue for this CSR (PEM or DER) instead of a new key.")
]
RotateOpt = Annotated[
    bool, typer.Option("--rotate", help="Replace an active certificate (the old one is revoked).")
]
DaysOpt = Annotated[
    int | None, typer.Option("--days", help="Validity in days (default from pki.toml).")
]


@device_app.command("issue")
def device_issue(
    device_id: Annotated[str, typer.Argument(help="Device id: 1-64 of a-z, 0-9, '-'.")],
    pki: PkiOpt,
    out_dir: OutOpt = None,
    csr: CsrOpt = None,
    rotate: RotateOpt = False,
    hardware_serial: Annotated[
        str | None, typer.Option("--hardware-serial", help="The unit's hardware serial number.")
    ] = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="HOST:PORT written into identity.json.")
    ] = None,
    days: DaysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a device certificate (station-generated key, or from a CSR)."""
    _issue(
        IdentityKind.DEVICE,
        device_id,
        pki,
        out_dir,
        csr,
        rotate,
        hardware_serial,
        broker,
        days,
        as_json,
    )


@device_app.command("token")
def device_token(
    device_id: Annotated[str, typer.Argument(help="The device whose key signs the token.")],
    creds: Annotated[
        Path,
        typer.Option("--creds", help="The device's credential directory.", show_default=False),
    ],
    ttl: Annotated[
        int, typer.Option("--ttl", help="Lifetime in seconds (1-86400).", show_default=True)
    ] = 3600,
    audience: Annotated[
        str | None, typer.Option("--audience", help="aud claim (default: the trust domain).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a device token (JWT signed by the device key): the MQTT password of the jwt method."""
    from provisioning.tokens import token_for_credentials

    with user_errors():
        token, claims = token_for_credentials(creds, device_id, ttl=ttl, audience=audience)
    if as_json:
        print_json({"token": token, "claims": claims})
    else:
        print(token)


@service_app.command("issue")
def service_issue(
    name: Annotated[str, typer.Argument(help="Service name: 1-64 of a-z, 0-9, '-'.")],
    pki: PkiOpt,
    out_dir: OutOpt = None,
    csr: CsrOpt = None,
    rotate: RotateOpt = False,
    broker: Annotated[
        str | None, typer.Option("--broker", help="HOST:PORT written into identity.json.")
    ] = None,
    days: DaysOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a backend identity (SAN spiffe://<domain>/service/<name>)."""
    _issue(IdentityKind.SERVICE, name, pki, out_dir, csr, rotate, None, broker, days, as_json)


@service_app.command("secret")
def service_secret(
    name: Annotated[str, typer.Argument(help="Service name: 1-64 of a-z, 0-9, '-'.")],
    pki: PkiOpt,
    as_json: JsonOpt = False,
) -> None:
    """Create or rotate a service's shared secret (password and SCRAM methods); print it once.

    The registry keeps only its SCRAM-SHA-256 verifier; the ledger records the creation or
    rotation, never the secret. A rotation ends the broker's sessions that used the old one.
    A service needs no certificate to have a secret: this registers it.
    """
    with user_errors():
        validate_name(name, what="service name")
        with _open(pki) as ca:
            secret, record, replaced = ca.set_service_secret(name)
    if as_json:
        print_json({**record.to_json(), "secret": secret, "replaced_version": replaced})
        return
    action = f"Rotated (version {replaced} -> {record.version})" if replaced else "Created"
    err.print(
        f"{action} the secret of service {name}; it is shown once, store it now "
        f"(the registry keeps only its {record.mechanism} verifier):"
    )
    print(secret)


@service_app.command("register")
def service_register(
    name: Annotated[str, typer.Argument(help="Service name: 1-64 of a-z, 0-9, '-'.")],
    pki: PkiOpt,
    as_json: JsonOpt = False,
) -> None:
    """Register a service by name alone, with no certificate and no secret (the oidc method:
    its identity provider's token names it). 'iotauth service revoke NAME' undoes it."""
    with user_errors():
        validate_name(name, what="service name")
        with _open(pki) as ca:
            record = ca.register_service(name)
    if as_json:
        print_json({**record.to_json(), "methods": ["oidc"]})
        return
    err.print(
        f"Registered service {name} (methods: oidc, with a token from the broker's identity "
        "provider; no certificate, no secret)"
    )


def _list(kind: IdentityKind, pki: Path, as_json: bool, show_all: bool) -> None:
    with user_errors(), _open(pki) as ca:
        rows = ca.registry.all() if show_all else ca.registry.latest(kind.value)
        rows = [r for r in rows if r.kind == kind.value]
        secrets = _service_secrets(ca) if kind is IdentityKind.SERVICE else {}
        registered = _service_registrations(ca) if kind is IdentityKind.SERVICE else {}
    if kind is IdentityKind.SERVICE:
        _list_services(rows, secrets, registered, pki, as_json)
        return
    if as_json:
        print_json([r.to_json() for r in rows])
        return
    table = Table(title=f"{plural(len(rows), kind.value)} in {pki}", title_justify="left")
    for col in ("name", "state", "serial", "not after", "hardware", "key", "issued by"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.name,
            _styled(r.state()),
            r.serial[:12],
            r.not_after.strftime("%Y-%m-%d"),
            r.hardware_serial or "-",
            r.key_origin,
            r.issued_by,
        )
    out.print(table)


_STATE_STYLES = {"active": "green", "revoked": "red", "expired": "yellow"}
# The certificate-record keys (docs/JSON.md), null for a service that has only a secret.
_NO_CERTIFICATE: dict[str, object] = dict.fromkeys(
    [
        "serial",
        "fingerprint",
        "public_key_sha256",
        "key_origin",
        "not_before",
        "not_after",
        "state",
        "issued_at",
        "issued_by",
        "hardware_serial",
        "revoked_at",
        "revocation_reason",
    ]
)


def _styled(state: str) -> str:
    return f"[{_STATE_STYLES[state]}]{state}[/]"


def _service_secrets(ca: PKI) -> dict[str, SecretRecord]:
    """Every service's secret verifier (active or revoked), by name: what list and show report
    about it, never its key material."""
    found = (ca.registry.secret(name) for name in sorted(ca.registry.secret_states()))
    return {record.name: record for record in found if record is not None}


def _service_registrations(ca: PKI) -> dict[str, RegistrationRecord]:
    """Every service registered by name (``service register``), active or revoked."""
    found = (ca.registry.registration(n) for n in sorted(ca.registry.registration_states()))
    return {record.name: record for record in found if record is not None}


def _registered(record: RegistrationRecord | None) -> bool:
    return record is not None and record.status == "active"


def _registration_json(record: RegistrationRecord | None) -> dict[str, object] | None:
    return None if record is None else record.to_json()


def _secret_json(record: SecretRecord | None) -> dict[str, object] | None:
    """The secret without its verifier keys: ``created_at`` is when this version was made (the
    creation for version 1, else the last rotation)."""
    if record is None:
        return None
    doc = record.to_json()
    doc["rotated"] = record.version > 1
    return doc


def _secret_text(record: SecretRecord | None) -> str:
    if record is None:
        return "-"
    made = "rotated" if record.version > 1 else "created"
    text = f"v{record.version} {made} {record.created_at:%Y-%m-%d %H:%M}, {record.iterations} it."
    return text if record.status == "active" else f"{text}, revoked"


def _list_services(
    rows: list[CertRecord],
    secrets: dict[str, SecretRecord],
    registered: dict[str, RegistrationRecord],
    pki: Path,
    as_json: bool,
) -> None:
    """Services with their newest certificate (``--all``: every one), and the services that have
    no certificate (a secret, a registration by name, or both); each with its methods, its
    secret (version, time, iterations) and its registration."""
    certified = {r.name for r in rows if r.state() == "active"}
    secret_only = sorted((set(secrets) | set(registered)) - {r.name for r in rows})

    def methods(name: str) -> list[str]:
        return service_methods(
            certified=name in certified,
            secret=secrets.get(name),
            registered=_registered(registered.get(name)),
        )

    if as_json:
        docs = [
            {
                **r.to_json(),
                "methods": methods(r.name),
                "secret": _secret_json(secrets.get(r.name)),
                "registration": _registration_json(registered.get(r.name)),
            }
            for r in rows
        ]
        docs += [
            {
                "kind": IdentityKind.SERVICE.value,
                "name": name,
                **_NO_CERTIFICATE,
                "methods": methods(name),
                "secret": _secret_json(secrets.get(name)),
                "registration": _registration_json(registered.get(name)),
            }
            for name in secret_only
        ]
        print_json(docs)
        return
    count = len({r.name for r in rows}) + len(secret_only)
    table = Table(title=f"{plural(count, 'service')} in {pki}", title_justify="left")
    for col in ("name", "state", "methods", "serial", "not after", "secret", "issued by"):
        table.add_column(col)
    for r in rows:
        secret = secrets.get(r.name)
        table.add_row(
            r.name,
            _styled(r.state()),
            ", ".join(methods(r.name)) or "-",
            r.serial[:12],
            r.not_after.strftime("%Y-%m-%d"),
            _secret_text(secret),
            r.issued_by,
        )
    for name in secret_only:
        registration = registered.get(name)
        table.add_row(
            name,
            "registered" if _registered(registration) else "no certificate",
            ", ".join(methods(name)) or "-",
            "-",
            "-",
            _secret_text(secrets.get(name)),
            "-",
        )
    out.print(table)


AllOpt = Annotated[
    bool, typer.Option("--all", help="Every certificate, not just the newest per name.")
]


@device_app.command("list")
def device_list(pki: PkiOpt, as_json: JsonOpt = False, show_all: AllOpt = False) -> None:
    """Every device with its newest certificate."""
    _list(IdentityKind.DEVICE, pki, as_json, show_all)


@service_app.command("list")
def service_list(pki: PkiOpt, as_json: JsonOpt = False, show_all: AllOpt = False) -> None:
    """Every service: its newest certificate (or none: a secret only), methods and secret."""
    _list(IdentityKind.SERVICE, pki, as_json, show_all)


def _show(kind: IdentityKind, name: str, pki: Path, as_json: bool) -> None:
    service = kind is IdentityKind.SERVICE
    with user_errors():
        validate_name(name, what="service name" if service else "device id")
        with _open(pki) as ca:
            everything = ca.registry.history(name)
            spiffe = Identity(kind, name, ca.trust_domain).spiffe_id
            secret = ca.service_secret(name)
            registration = ca.service_registration(name)
        history = [r for r in everything if r.kind == kind.value]
        if not history and ((secret is None and registration is None) or not service):
            other = everything[0].kind if everything else None
            if other is None and (secret is not None or registration is not None):
                other = IdentityKind.SERVICE.value  # a service with no certificate
            where = f"not a {kind.value} but a {other}: use 'iotauth {other} show {name}'"
            msg = f"{kind.value} {name!r} is {where if other else 'not in the registry'}"
            raise ProvisioningError(msg)
    certified = any(r.state() == "active" for r in history)
    registered = _registered(registration)
    if as_json:
        key = "service" if service else "device_id"
        doc: dict[str, object] = {
            key: name,
            "spiffe_id": spiffe,
            "certificates": [r.to_json() for r in history],
        }
        if service:
            doc["methods"] = service_methods(
                certified=certified, secret=secret, registered=registered
            )
            doc["secret"] = _secret_json(secret)
            doc["registration"] = _registration_json(registration)
        print_json(doc)
        return
    state = history[-1].state() if history else "no certificate"
    out.print(f"[bold]{name}[/bold]  {spiffe}  ({state})", markup=True)
    if service:
        held = service_methods(certified=certified, secret=secret, registered=registered)
        methods = ", ".join(held) or "none"
        out.print(f"  methods     {methods} (as the broker's listeners allow)")
        if registration is not None:
            line = f"  registered  {_when(registration.registered_at)} (by name, for oidc)"
            out.print(line)
            if registration.revoked_at is not None:
                out.print(f"              revoked {_when(registration.revoked_at)}")
        if secret is not None:
            made = "rotated" if secret.version > 1 else "created"
            out.print(
                f"  secret      version {secret.version}, {secret.mechanism}, "
                f"{secret.iterations} iterations, {made} {_when(secret.created_at)}"
            )
            if secret.revoked_at is not None:
                out.print(f"              revoked {_when(secret.revoked_at)}")
        else:
            out.print("  secret      none (iotauth service secret NAME makes one)")
    for r in history:
        _print_record(r)


@device_app.command("show")
def device_show(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    pki: PkiOpt,
    as_json: JsonOpt = False,
) -> None:
    """One device: every certificate it has had, newest last."""
    _show(IdentityKind.DEVICE, device_id, pki, as_json)


@service_app.command("show")
def service_show(
    name: Annotated[str, typer.Argument(help="Service name.")],
    pki: PkiOpt,
    as_json: JsonOpt = False,
) -> None:
    """One service: its methods, its secret (never the secret itself), every certificate."""
    _show(IdentityKind.SERVICE, name, pki, as_json)


def _cert_json(cert: x509.Certificate) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _print_record(r: CertRecord) -> None:
    out.print(f"  serial      {r.serial}  ({r.state()})")
    out.print(f"  sha256      {r.fingerprint}")
    out.print(f"  public key  {r.public_key_sha256} ({r.key_origin})")
    out.print(f"  valid       {_when(r.not_before)} .. {_when(r.not_after)}")
    out.print(f"  issued      {_when(r.issued_at)} by {r.issued_by}")
    if r.hardware_serial:
        out.print(f"  hardware    {r.hardware_serial}")
    if r.revoked_at:
        out.print(f"  revoked     {_when(r.revoked_at)} ({r.revocation_reason})")


ReasonOpt = Annotated[
    str,
    typer.Option("--reason", help=f"One of: {', '.join(REVOCATION_REASONS)}."),
]


ExportOpt = Annotated[
    Path | None,
    typer.Option(
        "--export",
        help="Also write the new CRL into this 'iotauth broker export' directory (atomically).",
    ),
]
ReloadOpt = Annotated[
    bool,
    typer.Option(
        "--reload",
        help="With --export: SIGHUP the exported Mosquitto and close the revoked live sessions.",
    ),
]


def _revoke(
    kind: IdentityKind,
    name: str,
    pki: Path,
    reason: str,
    export: Path | None = None,
    reload: bool = False,
    as_json: bool = False,
) -> None:
    with user_errors():
        validate_name(name, what="device id" if kind is IdentityKind.DEVICE else "service name")
        if reload and export is None:
            msg = "--reload needs --export DIR (the directory 'iotauth broker export' wrote)"
            raise ProvisioningError(msg)

        def say(line: str) -> None:
            if not as_json:  # with --json, stdout holds the one JSON document
                out.print(line)

        with _open(pki) as ca:
            had_secret = kind is IdentityKind.SERVICE and _active_secret(ca, name)
            was_registered = kind is IdentityKind.SERVICE and _registered(
                ca.service_registration(name)
            )
            rows = ca.revoke(name, reason=reason, kind=kind)
            info = ca.crl_info()
            for r in rows:
                say(f"Revoked {kind.value} {name} serial {r.serial} ({reason})")
            if had_secret:
                say(f"Revoked the secret of service {name} ({reason})")
            if was_registered:
                say(f"Revoked the registration of service {name} ({reason})")
            say(f"CRL #{info.number} written to {pki / 'crl.pem'}")
            # Another station's certificate: only its key signs its CRL (brokers refuse it now).
            foreign = sorted(
                {st.name for r in rows for st in ca.stations() if st.fingerprint == r.issuer}
                - {ca.config.station}
            )
            for station in foreign:
                say(
                    f"Issued by station {station}: brokers refuse it now; {station}'s CRL lists "
                    f"it once {station} re-signs it (a broker running from its directory does at "
                    "once; else its next write, or 'iotauth ca crl --pki' on it)"
                )
            doc: dict[str, object] = {
                "kind": kind.value,
                "name": name,
                "reason": reason,
                "revoked": [r.serial for r in rows],
                "secret_revoked": bool(had_secret),
                "registration_revoked": bool(was_registered),
                "crl": {"number": info.number, "path": str(pki / "crl.pem")},
                "issued_by_other_stations": foreign,
                "export": None,
                "warnings": [],
            }
            if export is not None:
                from provisioning.export_hook import ExportHookError, publish_crl

                try:
                    report = publish_crl(export, ca, reload=reload, names=[name])
                except ExportHookError as exc:
                    msg = f"{name} is revoked in {pki}, but the export was not fully updated: {exc}"
                    raise ProvisioningError(msg) from None
                say(f"CRL #{report.crl_number} copied to {report.crl_path}")
                if report.reloaded_pid is not None:
                    say(f"Mosquitto (pid {report.reloaded_pid}) reloaded (SIGHUP)")
                for kicked in report.kicked:
                    say(f"Closed the live sessions of {kicked}")
                for note in report.notes:
                    err.print(f"[yellow]warning:[/yellow] {escape(str(note))}", markup=True)
                doc["export"] = {
                    "crl_path": str(report.crl_path),
                    "crl_number": report.crl_number,
                    "reloaded_pid": report.reloaded_pid,
                    "kicked": list(report.kicked),
                }
                doc["warnings"] = [str(n) for n in report.notes]
        if as_json:
            print_json(doc)


def _active_secret(ca: PKI, name: str) -> bool:
    record = ca.service_secret(name)
    return record is not None and record.status == "active"


@device_app.command("revoke")
def device_revoke(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    pki: PkiOpt,
    reason: ReasonOpt = "unspecified",
    export: ExportOpt = None,
    reload: ReloadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a device's active certificate(s), record it, and publish a new CRL."""
    _revoke(IdentityKind.DEVICE, device_id, pki, reason, export, reload, as_json)


@service_app.command("revoke")
def service_revoke(
    name: Annotated[str, typer.Argument(help="Service name.")],
    pki: PkiOpt,
    reason: ReasonOpt = "unspecified",
    export: ExportOpt = None,
    reload: ReloadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a service's active certificate(s) and publish a new CRL."""
    _revoke(IdentityKind.SERVICE, name, pki, reason, export, reload, as_json)


# -- ledger ------------------------------------------------------------------------------------


@ledger_app.command("verify")
def ledger_verify(
    pki: PkiOpt,
    export: Annotated[
        Path | None,
        typer.Option("--export", help="After verifying, write the ledger as JSONL to this file."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", help="Verify this exported JSONL copy instead (signers from --pki)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain, the signatures and the registry's record of the last entry."""
    with user_errors(), _open(pki) as ca:
        try:
            if file is not None:
                _verify_ledger_file(ca, file, as_json=as_json)
                return
            report = ca.export_ledger(export) if export is not None else ca.verify_ledger()
        except LedgerCorruptError as exc:
            if as_json:  # the verdict is the result: a script reads it, the line goes to stderr
                print_json({"ok": False, "error": str(exc), "line": exc.line, "warnings": []})
            raise
        for warning in report.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(warning)}", markup=True)
        if as_json:
            print_json(
                {
                    "ok": True,
                    "entries": report.entries,
                    "head": {"seq": report.head.seq, "hash": report.head.hash},
                    **({"exported": str(export)} if export is not None else {}),
                    "warnings": list(report.warnings),
                }
            )
            return
        signers = "every station's issuing CA" if ca.registry.shared else "the issuing CA"
        out.print(
            f"ledger OK: {plural(report.entries, 'entry', 'entries')}, chained and signed by "
            f"{signers}; head {report.head.hash[:16]}"
        )
        if export is not None:
            out.print(f"ledger written to {export} ({report.entries} lines, JSONL)")


def _verify_ledger_file(ca: PKI, file: Path, *, as_json: bool) -> None:
    """``ledger verify --file``: an exported copy, checked with the signers the PKI knows."""
    from provisioning.ledger import Ledger

    if not file.is_file():
        msg = f"{file} does not exist"
        raise ProvisioningError(msg)
    keys, own = ca.station_keys(), ca.issuer_fingerprint
    entries = Ledger(file).verify(key_for=lambda e: keys.get(str(e.data.get("signed_by", own))))
    if as_json:
        print_json({"ok": True, "file": str(file), "entries": len(entries), "warnings": []})
        return
    out.print(
        f"{file} OK: {plural(len(entries), 'entry', 'entries')}, chained and signed by known CAs"
    )


@ledger_app.command("export")
def ledger_export(
    pki: PkiOpt,
    out_file: Annotated[Path, typer.Option("--out", help="JSONL file to write (replaced).")],
    as_json: JsonOpt = False,
) -> None:
    """Verify, then write the ledger in the ledger.jsonl format for an auditor."""
    with user_errors(), _open(pki) as ca:
        report = ca.export_ledger(out_file)
        if as_json:
            doc = {"ok": True, "out": str(out_file), "entries": report.entries, "warnings": []}
            print_json(doc)
            return
        out.print(f"ledger written to {out_file} ({report.entries} lines, verified)")


@ledger_app.command("show")
def ledger_show(
    pki: PkiOpt,
    tail: Annotated[int, typer.Option("--tail", help="Show the last N entries (0 = all).")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Print ledger entries (no verification; use 'ledger verify')."""
    with user_errors(), _open(pki) as ca:
        entries = [e for _, e in ca.ledger.entries()]
    if tail:
        entries = entries[-tail:]
    if as_json:
        print_json(
            [
                {"seq": e.seq, "time": e.time, "event": e.event, "data": e.data, "hash": e.hash}
                for e in entries
            ]
        )
        return
    for e in entries:
        subject = e.data.get("name") or e.data.get("trust_domain") or ""
        out.print(f"{e.seq:>6}  {e.time[:19]}  {e.event:<10} {subject}")
