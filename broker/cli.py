"""``iotauth broker run|renewal|explain|export``: the broker's commands, mounted by iotauth.cli.

Errors a user can fix (missing PKI, bad policy, port in use) are one line on stderr and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from broker.auth_oidc import OIDCSettings
from broker.errors import BrokerError
from broker.policy import Action, load_policy
from broker.runconfig import RunConfig, load_run_config
from broker.settings import DEFAULT_METHODS_BY_KIND, Limits, ListenerSpec
from provisioning.config import PKIConfig
from provisioning.errors import ProvisioningError
from provisioning.identity import Identity, IdentityKind
from provisioning.registry import CertRecord
from provisioning.service_secrets import service_methods

__all__ = ["broker_app"]

log = logging.getLogger("iotauth.broker")

broker_app = typer.Typer(
    help="The hardened MQTT broker: mutual TLS, identity from certificates, per-identity ACLs.",
    no_args_is_help=True,
)

PkiOpt = Annotated[
    Path,
    typer.Option(
        "--pki", envvar="IOTAUTH_PKI", help="PKI directory (env IOTAUTH_PKI).", show_default=False
    ),
]
PolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--policy", help="Policy TOML file (default: the built-in policy, docs/BROKER.md)."
    ),
]


def _fail(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(1)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """One line and exit 1 for anything the user can fix; never a traceback."""
    try:
        yield
    except (BrokerError, ProvisioningError) as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise _fail(f"{exc.strerror or exc}{where}") from None


_DEFAULT_LIMITS = Limits()
_SPARE_FILES = 256  # the PKI, the audit sink, the renewal service, the metrics endpoint ...


def _raise_file_limit(connections: int) -> None:
    """One socket per connection: raise the soft RLIMIT_NOFILE so ``--max-connections`` is
    reachable, or say at start (not at the 1,000th device) that the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _SPARE_FILES
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "open-file limit %d leaves room for about %d connections, not %d (raise 'ulimit -Hn')",
            target,
            target - _SPARE_FILES,
            connections,
        )


def _oidc_settings(
    issuer: str | None,
    audience: str | None,
    jwks: str | None,
    claim: str,
    cafile: Path | None,
) -> OIDCSettings | None:
    """The identity provider, when any --oidc-* option is given (all three main ones needed)."""
    if issuer is None and audience is None and jwks is None:
        return None
    return OIDCSettings(
        issuer=issuer or "", audience=audience or "", jwks=jwks or "", claim=claim, cafile=cafile
    )


@broker_app.command("run")
def run(
    pki: PkiOpt,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 8883,
    policy: PolicyOpt = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    renewal: Annotated[
        bool,
        typer.Option(
            "--renewal/--no-renewal",
            help="Run the certificate renewal service in this process (holds the issuing CA).",
        ),
    ] = True,
    renewal_offer_ttl: Annotated[
        float,
        typer.Option(
            "--renewal-offer-ttl", min=10, help="Seconds a renewed certificate waits to be used."
        ),
    ] = 3600.0,
    renewal_per_day: Annotated[
        int,
        typer.Option(
            "--renewal-per-day",
            min=1,
            help="Certificates the renewal service signs for one device per 24 h at most.",
        ),
    ] = 4,
    renewal_min_life: Annotated[
        float,
        typer.Option(
            "--renewal-min-life",
            min=0.0,
            max=0.99,
            help="Renew only past this fraction of the current certificate's life (0: any time).",
        ),
    ] = 0.0,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            min=1,
            help="Connections (handshaking or established) above which new sockets are closed.",
        ),
    ] = _DEFAULT_LIMITS.max_connections,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            metavar="PORT:METHODS",
            help=(
                "A listener and the methods it accepts, e.g. 8883:mtls or 8884:jwt "
                "(repeatable; replaces --port). Methods: mtls, jwt, password, oidc, scram."
            ),
        ),
    ] = None,
    token_max_ttl: Annotated[
        int | None,
        typer.Option(
            "--token-max-ttl",
            min=1,
            max=86400,
            help="Longest device-token lifetime accepted (s; default 3600).",
        ),
    ] = None,
    token_audience: Annotated[
        str | None,
        typer.Option(
            "--token-audience",
            help="The aud device tokens must name (default: the trust domain); "
            "'iotauth device token --audience' makes such tokens.",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where persistent sessions, queues and retained messages are kept "
            "(default: PKI/broker-state).",
        ),
    ] = None,
    persist: Annotated[
        bool,
        typer.Option(
            "--persist/--no-persist",
            help="Keep state on disk across restarts and crashes (--no-persist: memory only).",
        ),
    ] = True,
    oidc_issuer: Annotated[
        str | None,
        typer.Option("--oidc-issuer", help="oidc: the identity provider's issuer (iss)."),
    ] = None,
    oidc_audience: Annotated[
        str | None,
        typer.Option("--oidc-audience", help="oidc: the audience (aud) tokens must name."),
    ] = None,
    oidc_jwks: Annotated[
        str | None,
        typer.Option(
            "--oidc-jwks", metavar="FILE|URL", help="oidc: the provider's JWKS (file or https)."
        ),
    ] = None,
    oidc_claim: Annotated[
        str, typer.Option("--oidc-claim", help="oidc: the claim that names the service.")
    ] = "sub",
    oidc_cafile: Annotated[
        Path | None,
        typer.Option(
            "--oidc-cafile", help="oidc: CA of the JWKS server's certificate (default: system)."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A TOML file with listen, [methods] per kind and [oidc] (docs/BROKER.md); "
            "--listen and --oidc-* given here win.",
        ),
    ] = None,
) -> None:
    """Run the broker until interrupted. Audit lines (JSON) go to stdout, logs to stderr.

    With the renewal service (the default) the broker connects to itself as the service
    identity 'renewal', whose certificate it issues into PKI/services/renewal on first start (the
    banner line says so); --no-renewal runs without it.
    """
    from broker.renewal import RenewalSettings
    from broker.server import run_broker
    from broker.settings import BrokerSettings, ListenerSpec
    from provisioning.pki import passphrase_from_env

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with _user_errors():
        if not (pki / "pki.toml").is_file():
            raise _fail(f"{pki} is not a PKI directory (no pki.toml); run 'iotauth ca init' first")
        _raise_file_limit(max_connections)
        from_file = load_run_config(config) if config is not None else RunConfig()
        settings = BrokerSettings(
            pki_dir=pki,
            host=host,
            port=port,
            limits=dataclasses.replace(_DEFAULT_LIMITS, max_connections=max_connections),
            policy=load_policy(policy),
            key_password=passphrase_from_env(),
            metrics_port=metrics_port,
            renewal=RenewalSettings(
                offer_ttl=renewal_offer_ttl,
                max_signatures=renewal_per_day,
                min_life_fraction=renewal_min_life,
            )
            if renewal
            else None,
            listeners=tuple(ListenerSpec.parse(text) for text in listen)
            if listen
            else from_file.listeners,
            methods_by_kind=from_file.methods_by_kind or dict(DEFAULT_METHODS_BY_KIND),
            token_max_ttl=token_max_ttl or from_file.token_max_ttl or 3600,
            token_audience=token_audience or from_file.token_audience,
            data_dir=(data_dir or pki / "broker-state") if persist else None,
            oidc=_oidc_settings(oidc_issuer, oidc_audience, oidc_jwks, oidc_claim, oidc_cafile)
            or from_file.oidc,
        )
        if data_dir is not None and not persist:
            raise _fail("--data-dir and --no-persist contradict each other: give one")

        def audit_line(line: str) -> None:
            print(line, flush=True)

        # The renewal service holds a service certificate of its own in the PKI; the banner says
        # when this start issued it, so no certificate appears in a registry unannounced.
        renewal_cert = pki / "services" / "renewal" / "device.crt"
        before = _read_or_none(renewal_cert) if renewal else None

        async def main() -> None:
            async with run_broker(settings, audit_sink=audit_line) as running:
                where = ", ".join(
                    f"{host}:{bound} ({spec.partition(':')[2]})"
                    for spec, bound in running.ports.items()
                )
                extra = (
                    f", metrics on 127.0.0.1:{running.metrics_port}"
                    if metrics_port is not None
                    else ""
                )
                state = running.state
                extra += (
                    f", state in {settings.data_dir}: {state.sessions} session(s), "
                    f"{state.queued + state.inflight} queued message(s), {state.retained} retained"
                    if state is not None
                    else ", state in memory only (--no-persist)"
                )
                print(
                    f"iotauth broker listening on {where} (CRL #{running.crl.number}{extra})"
                    f"; {_renewal_note(renewal, renewal_cert, before)}",
                    file=sys.stderr,
                    flush=True,
                )
                await asyncio.Event().wait()

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("broker stopped", file=sys.stderr)


def _run_as_hint(out: Path, run_as: str | None) -> str:
    """Mosquitto started as root drops to another user, who must own the export directory."""
    if run_as:
        return f"  as root it runs as user {run_as!r}, who must own {out}: chown -R {run_as} {out}"
    return (
        f"  as the user who owns {out}; as root Mosquitto switches to user 'mosquitto': "
        f"chown -R mosquitto {out}, or export again with --run-as USER"
    )


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _renewal_note(on: bool, cert: Path, before: bytes | None) -> str:
    """The banner's word on the renewal service and the certificate it runs as."""
    if not on:
        return "renewal service off (--no-renewal)"
    if _read_or_none(cert) != before:
        return (
            f"renewal service on, as service 'renewal': issued its certificate into "
            f"{cert.parent} now (--no-renewal turns the service off)"
        )
    return f"renewal service on, as service 'renewal' ({cert.parent})"


@broker_app.command("renewal")
def renewal_command(
    pki: PkiOpt,
    broker: Annotated[
        str,
        typer.Option("--broker", help="HOST:PORT of the MQTT broker to serve renewals through."),
    ],
    offer_ttl: Annotated[
        float,
        typer.Option("--offer-ttl", min=10, help="Seconds a renewed certificate waits to be used."),
    ] = 3600.0,
    per_day: Annotated[
        int,
        typer.Option(
            "--per-day", min=1, help="Certificates signed for one device per 24 h at most."
        ),
    ] = 4,
    min_life: Annotated[
        float,
        typer.Option(
            "--min-life",
            min=0.0,
            max=0.99,
            help="Renew only past this fraction of the current certificate's life (0: any time).",
        ),
    ] = 0.0,
    wait: Annotated[
        float,
        typer.Option("--wait", min=1, help="Seconds to wait for the broker at start."),
    ] = 30.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the renewal service beside another broker (an exported Mosquitto or EMQX).

    `broker run` includes this service; use this command when devices connect to a broker that is
    not ours. It connects as the service identity `renewal`, whose credentials it keeps in
    PKI/services/renewal (issue them before `broker export`, so the export grants the identity its
    topics: `iotauth service issue renewal --out PKI/services/renewal`), answers CSRs on
    devices/+/certs/csr, and records a renewal when the device reports the new certificate
    installed. Audit lines (JSON: renewal-offer, -recorded, -voided, -refused) go to stdout.
    """
    from broker.audit import AuditLog
    from broker.renewal import RenewalService, RenewalSettings
    from provisioning.pki import passphrase_from_env

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    host, sep, port_text = broker.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(f"--broker {broker!r} is not HOST:PORT")
    with _user_errors():
        if not (pki / "pki.toml").is_file():
            raise _fail(f"{pki} is not a PKI directory (no pki.toml); run 'iotauth ca init' first")
        service = RenewalService(
            pki,
            host=host,
            port=int(port_text),
            settings=RenewalSettings(
                offer_ttl=offer_ttl, max_signatures=per_day, min_life_fraction=min_life
            ),
            passphrase=passphrase_from_env(),
            audit=AuditLog(lambda line: print(line, flush=True)).emit,
        ).start()
        try:
            if not service.wait_subscribed(wait):
                raise _fail(
                    f"no subscription to devices/+/certs/csr at {broker} within {wait:.0f} s: "
                    "is the broker up, and does its ACL let the service 'renewal' read it?"
                )
            print(f"iotauth renewal service serving through {broker}", file=sys.stderr, flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        finally:
            service.stop()
        print("renewal service stopped", file=sys.stderr)


@broker_app.command("explain")
def explain(
    pki: PkiOpt,
    identity: Annotated[str, typer.Option("--identity", help="Device id (or service name).")],
    service: Annotated[bool, typer.Option("--service", help="The identity is a service.")] = False,
    subscribe: Annotated[
        str | None, typer.Option("--subscribe", help="A topic filter to SUBSCRIBE to.")
    ] = None,
    publish: Annotated[str | None, typer.Option("--publish", help="A topic to PUBLISH to.")] = None,
    policy: PolicyOpt = None,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            metavar="PORT:METHODS",
            help="The broker's listeners, as given to 'broker run' (default 8883:mtls): "
            "say which methods this identity may use on each.",
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="The file given to 'broker run --config': its listeners "
            "and methods per kind (--listen wins).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print whether the policy allows a SUBSCRIBE or PUBLISH, and the rule that decided.

    Exit status 0 for ALLOW, 2 for DENY. The ACL is only the last check: a note says when the
    identity has no active certificate in this PKI, so the broker would refuse it before.
    """
    from provisioning.pki import PKI

    with _user_errors():
        if (subscribe is None) == (publish is None):
            raise _fail("give exactly one of --subscribe FILTER or --publish TOPIC")
        config = PKIConfig.load(pki / "pki.toml") if (pki / "pki.toml").is_file() else None
        if config is None:
            raise _fail(f"{pki} is not a PKI directory (no pki.toml); run 'iotauth ca init' first")
        kind = IdentityKind.SERVICE if service else IdentityKind.DEVICE
        who = Identity(kind, identity, config.trust_domain)
        rules = load_policy(policy)
        if subscribe is not None:
            decision = rules.decide(who, Action.SUBSCRIBE, subscribe)
        else:
            assert publish is not None  # noqa: S101 - exactly one was given
            decision = rules.decide(who, Action.PUBLISH, publish)
        from_file = load_run_config(config_file) if config_file else RunConfig()
        if listen:
            specs = [ListenerSpec.parse(text) for text in listen]
        else:
            specs = list(from_file.listeners) or [ListenerSpec.parse("8883:mtls")]
        by_kind = from_file.methods_by_kind or DEFAULT_METHODS_BY_KIND
        with PKI.open(pki) as ca:  # the registry only: no key is loaded
            secret = ca.service_secret(identity) if service else None
            registration = ca.service_registration(identity) if service else None
            registered = registration is not None and registration.status == "active"
            has_secret = secret is not None and secret.status == "active"
            history = ca.registry.history(identity)
            note = _refused_before_acl(who, history, has_secret=has_secret, registered=registered)
        # What the listener takes, what the kind may use, and what the identity holds.
        certified = any(r.kind == kind.value and r.state() == "active" for r in history)
        held = (
            set(service_methods(certified=certified, secret=secret, registered=registered))
            if service
            else ({"mtls", "jwt"} if certified else set())
        )
        methods = {
            str(spec.port): sorted(spec.methods & by_kind[kind.value] & held) for spec in specs
        }
        if as_json:
            doc = {
                "identity": who.spiffe_id,
                "action": decision.action.value,
                "topic": decision.topic,
                "allowed": decision.allowed,
                "rule": decision.rule,
                "grant": decision.grant,
                "reason": decision.reason,
                "policy": str(rules.source),
                "methods": methods,
                "warnings": [note] if note else [],
            }
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            print(decision.describe())
            print(f"  policy: {rules.source}")
            for port, names in methods.items():
                print(f"  methods on {port}: {', '.join(names) or 'none'}")
            if note:
                print(f"  note: {note}")
        if not decision.allowed:
            raise typer.Exit(2)


def _refused_before_acl(
    who: Identity,
    history: list[CertRecord],
    *,
    has_secret: bool = False,
    registered: bool = False,
) -> str | None:
    """Why the broker would refuse this identity at the TLS handshake, or None if it would not."""
    kind = who.kind.value
    before = "so the broker refuses it at the TLS handshake, before any ACL"
    if has_secret and not any(r.state() == "active" for r in history):
        return (
            f"service {who.name} has no active certificate: it comes in with its secret "
            "(scram, password) or an identity-provider token (oidc), not with mtls"
        )
    if registered and not any(r.state() == "active" for r in history):
        return (
            f"service {who.name} is registered by name only: it comes in with an "
            "identity-provider token (oidc), not with mtls"
        )
    if not history:
        return f"{kind} {who.name} is not in the registry: no certificate of this PKI, {before}"
    other = history[-1].kind
    if other != kind:
        flag = "add --service" if other == "service" else "drop --service"
        return f"{who.name} is a {other}, not a {kind} ({flag}): no {kind} certificate, {before}"
    states = {r.state() for r in history}
    if "active" in states:
        return None
    state = history[-1].state()  # revoked or expired
    return f"{kind} {who.name} has no active certificate (the newest is {state}), {before}"


@broker_app.command("export")
def export_command(
    pki: PkiOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory to write (or refresh).")],
    fmt: Annotated[
        str, typer.Option("--format", help="mosquitto (a complete config directory) or emqx.")
    ] = "mosquitto",
    policy: PolicyOpt = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Listener address (default: all interfaces).")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Listener port.")] = 8883,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse instead of exporting a narrower policy.")
    ] = False,
    run_as: Annotated[
        str | None,
        typer.Option("--run-as", help="Mosquitto: the `user` to run as when started as root."),
    ] = None,
    kick: Annotated[
        bool,
        typer.Option(
            "--kick/--no-kick",
            help="Mosquitto: a local dynamic-security admin socket that closes revoked sessions.",
        ),
    ] = True,
    dynsec_plugin: Annotated[
        Path | None,
        typer.Option("--dynsec-plugin", help="Mosquitto: path of mosquitto_dynamic_security.so."),
    ] = None,
    admin_socket: Annotated[
        Path | None,
        typer.Option("--admin-socket", help="Mosquitto: the kick channel's unix socket path."),
    ] = None,
    emqx_dir: Annotated[
        str | None,
        typer.Option("--emqx-dir", help="EMQX: where the files will live on each node."),
    ] = None,
    listen: Annotated[
        list[str] | None,
        typer.Option(
            "--listen",
            metavar="PORT:METHODS",
            help="The listeners as given to 'broker run' (replaces --port): the mtls one is "
            "exported; every other method gets a warning per identity (not enforceable there).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Write Mosquitto or EMQX configuration from this PKI, its registry and a policy."""
    from broker.export import FORMATS, export, load_inventory
    from provisioning.pki import passphrase_from_env

    with _user_errors():
        if fmt not in FORMATS:
            raise _fail(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
        if not (pki / "pki.toml").is_file():
            raise _fail(f"{pki} is not a PKI directory (no pki.toml); run 'iotauth ca init' first")
        rules = load_policy(policy)
        inventory = load_inventory(pki, passphrase=passphrase_from_env())
        options: dict[str, object] = {
            "host": host,
            "port": port,
            "run_as": run_as,
            "kick": kick,
            "dynsec_plugin": dynsec_plugin,
            "admin_socket": admin_socket,
            "emqx_dir": emqx_dir,
        }
        specs = [ListenerSpec.parse(text) for text in listen or ()]
        result = export(
            rules, inventory, out, fmt=fmt, strict=strict, options=options, listeners=specs
        )
        for note in result.notes:
            print(note, file=sys.stderr)
        if as_json:
            doc = {
                "format": fmt,
                "out": str(result.out),
                "files": result.files,
                "policy": str(rules.source),
                "devices": len(inventory.devices),
                "services": len(inventory.services),
                "narrowed": result.narrowed,
                "notes": [n.to_json() for n in result.notes],
                "warnings": [str(n) for n in result.notes if n.level == "warning"],
            }
            print(json.dumps(doc, indent=2, sort_keys=True))
            return
        print(
            f"{fmt} configuration written to {result.out} ({len(inventory.devices)} devices, "
            f"{len(inventory.services)} services active; policy {rules.source})"
        )
        if fmt == "mosquitto":
            print(f"start it with: mosquitto -c {result.out / 'mosquitto.conf'}")
            print(_run_as_hint(result.out, run_as))
        narrowed = sum(1 for n in result.notes if n.level == "warning")
        if narrowed:
            print(f"{narrowed} warning(s): the export grants less than the policy (see above)")
