"""The Mosquitto (2.0.x) export: mosquitto.conf, an ACL file translated from the policy, certs, CRL.

Mosquitto sees one thing of a client certificate: its CN, which ``use_identity_as_username`` makes
the user name (our CN is the device id or service name). The translation:

- ``device``/``any`` rules without ``names`` become ``pattern`` lines with ``%u`` for the name.
  Mosquitto applies patterns to *every* user, services included, so each service gets ``topic
  deny`` lines for what the device patterns would give its name. A service grant that overlaps
  such a deny is lost: that is reported as a warning (narrower, never wider).
- ``service`` rules, and rules with ``names``, become ``user`` blocks for the identities that are
  active in the registry now. Identities issued later get no block until the next export.
- A template whose literal text contains ``%c`` or ``%u`` would be rewritten by Mosquitto's
  pattern substitution, and a filter with leading/trailing blanks or a line break cannot be one
  ACL line: both are dropped with a warning.

Revocation: ``crlfile`` is re-read on SIGHUP (``pid_file`` says where to send it), which refuses
new handshakes of revoked certificates but keeps live sessions. Those are closed through the
dynamic-security plugin's ``disableClient`` on a local admin socket (the "kick channel"), which
``iotauth device revoke --export DIR --reload`` drives with ``mosquitto_ctrl``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from broker.export import (
    ExportError,
    ExportFile,
    Inventory,
    Note,
    overlaps,
    render_filter,
)
from broker.policy import Policy, Rule

__all__ = [
    "ADMIN_USER",
    "DYNSEC_PLUGIN_PATHS",
    "UNSUPPORTED_METHODS",
    "MosquittoACL",
    "build_mosquitto",
    "find_dynsec_plugin",
    "translate_acl",
]

ADMIN_USER = "iotauth_admin"  # '_' is not valid in our names: no certificate can carry this CN
DYNSEC_PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto/mosquitto_dynamic_security.so",
)
# Mosquitto 2.0 without an auth plugin knows client certificates and its own password file
# (PBKDF2-SHA512 of the password, "$7$"): nothing else of ours can be checked there.
UNSUPPORTED_METHODS = {
    "jwt": "Mosquitto 2.0 checks tokens only through an auth plugin, and none is exported",
    "oidc": "Mosquitto 2.0 checks tokens only through an auth plugin, and none is exported",
    "password": (
        "Mosquitto's password_file holds its own PBKDF2-SHA512 hash of each password, and the "
        "registry holds only the SCRAM-SHA-256 verifier (never the secret), which cannot be "
        "turned into one"
    ),
    "scram": "Mosquitto 2.0 has no SCRAM (MQTT 5 enhanced authentication needs a plugin)",
}
_SUN_PATH_MAX = 107  # AF_UNIX sun_path is 108 bytes including the terminating NUL
_PLACEHOLDER = "\x00"  # never in a valid filter, so it marks where the name goes


def find_dynsec_plugin() -> Path | None:
    for candidate in DYNSEC_PLUGIN_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


@dataclass
class _Block:
    """Topics of one ``user`` block: topic -> access words, plus the rules they came from."""

    access: dict[str, set[str]] = field(default_factory=dict)
    rules: dict[str, set[str]] = field(default_factory=dict)
    denies: dict[str, str] = field(default_factory=dict)  # topic -> device rule it cancels

    def grant(self, topic: str, access: str, rule: str) -> None:
        self.access.setdefault(topic, set()).add(access)
        self.rules.setdefault(topic, set()).add(rule)


@dataclass
class MosquittoACL:
    text: str
    notes: list[Note]
    patterns: list[str]
    users: dict[str, _Block]


def _access_word(words: set[str]) -> str:
    return "readwrite" if words == {"read", "write"} else next(iter(words))


def _line_problem(topic: str) -> str | None:
    if topic != topic.strip() or any(ch in topic for ch in "\r\n"):
        return "it has leading/trailing blanks or a line break, which an ACL line cannot hold"
    return None


def _grants(rule: Rule) -> list[tuple[str, str]]:
    return [(t, "write") for t in rule.publish] + [(t, "read") for t in rule.subscribe]


def translate_acl(  # noqa: PLR0912, PLR0915 - one pass per kind of rule, read together
    policy: Policy, inventory: Inventory, *, admin: str | None = ADMIN_USER
) -> MosquittoACL:
    """The ACL file for ``policy`` over the identities of ``inventory``, and what was lost."""
    notes: list[Note] = []
    td = inventory.trust_domain
    pattern_access: dict[str, set[str]] = {}
    pattern_rules: dict[str, set[str]] = {}
    device_patterns: dict[str, str] = {}  # pattern -> rule, the ones services must not get
    any_patterns: list[tuple[str, str, str]] = []  # (template, access, rule)
    users: dict[str, _Block] = {}
    active = {"device": set(inventory.devices), "service": set(inventory.services)}

    for rule in policy.rules:
        if rule.names is None and rule.kind in ("device", "any"):
            for template, access in _grants(rule):
                rendered = render_filter(template, td, _PLACEHOLDER)
                if "%c" in rendered or "%u" in rendered:
                    notes.append(
                        Note(
                            "warning",
                            f"{template!r} dropped: its literal text contains '%c' or '%u', which "
                            "Mosquitto's pattern substitution would rewrite",
                            rule.name,
                        )
                    )
                    continue
                problem = _line_problem(rendered)
                if problem:
                    notes.append(Note("warning", f"{template!r} dropped: {problem}", rule.name))
                    continue
                topic = rendered.replace(_PLACEHOLDER, "%u")
                pattern_access.setdefault(topic, set()).add(access)
                pattern_rules.setdefault(topic, set()).add(rule.name)
                if rule.kind == "device":
                    device_patterns.setdefault(topic, rule.name)
                else:
                    any_patterns.append((template, access, rule.name))
            continue
        kinds = ("device", "service") if rule.kind == "any" else (rule.kind,)
        candidates = sorted(n for k in kinds for n in active[k])
        targets = [n for n in candidates if rule.names is None or n in rule.names]
        for missing in sorted(set(rule.names or ()) - set(targets)):
            what = "identity" if rule.kind == "any" else rule.kind
            notes.append(
                Note(
                    "info",
                    f"no active {what} {missing!r} in the registry: nothing exported for it "
                    "(re-export after issuing it)",
                    rule.name,
                )
            )
        if not targets and rule.names is None:
            notes.append(
                Note("info", f"no active {rule.kind} in the registry: rule not exported", rule.name)
            )
        for name in targets:
            for template, access in _grants(rule):
                topic = render_filter(template, td, name)
                problem = _line_problem(topic)
                if problem:
                    notes.append(Note("warning", f"{template!r} dropped: {problem}", rule.name))
                    continue
                users.setdefault(name, _Block()).grant(topic, access, rule.name)

    # Device patterns reach services too: deny them per service, and report what that costs.
    for service in sorted(active["service"]):
        if not device_patterns:
            break
        block = users.setdefault(service, _Block())
        for pattern, source in device_patterns.items():
            block.denies.setdefault(pattern.replace("%u", service), source)
        granted = [(t, a, r) for t, a_ in block.access.items() for a in a_ for r in block.rules[t]]
        granted += [(render_filter(t, td, service), a, r) for t, a, r in any_patterns]
        lost = [
            (f"{access} {topic!r}", deny, rule)
            for topic, access, rule in granted
            for deny in block.denies
            if overlaps(topic, deny)
        ]
        if lost:
            what = ", ".join(dict.fromkeys(item for item, _, _ in lost))
            denied = ", ".join(repr(d) for d in dict.fromkeys(d for _, d, _ in lost))
            rules = ", ".join(sorted({r for _, _, r in lost}))
            notes.append(
                Note(
                    "warning",
                    f"service {service!r} loses {denied} from {what}: Mosquitto applies device "
                    "patterns to every user, so the export denies them to the service, and a deny "
                    "wins (no device can hold that name while the service is active)",
                    rules,
                )
            )
    if admin is not None:
        block = users.setdefault(admin, _Block())
        for pattern in pattern_access:
            block.denies.setdefault(pattern.replace("%u", admin), "")
        block.grant("$CONTROL/dynamic-security/#", "read", "")
        block.grant("$CONTROL/dynamic-security/#", "write", "")
    if device_patterns and active["service"]:
        notes.append(
            Note(
                "info",
                "a service issued after this export has no deny lines, so Mosquitto would give "
                "it the device patterns for its own name: re-export after issuing a service",
            )
        )

    text = _render_acl(td, pattern_access, pattern_rules, users, active, admin)
    return MosquittoACL(text, notes, list(pattern_access), users)


def _render_acl(
    td: str,
    pattern_access: dict[str, set[str]],
    pattern_rules: dict[str, set[str]],
    users: dict[str, _Block],
    active: dict[str, set[str]],
    admin: str | None,
) -> str:
    lines = [
        "# Generated by `iotauth broker export --format mosquitto`. Do not edit: re-export.",
        f"# Trust domain {td}; the user name is the client certificate's CN (the device id or",
        "# service name). Deny by default: a client gets only what a line below grants.",
        "",
    ]
    if pattern_access:
        lines.append("# Patterns apply to every user, with %u = its certificate CN.")
        for topic, words in pattern_access.items():
            rules = ", ".join(sorted(pattern_rules[topic]))
            lines.append(f"# rule(s): {rules}")
            lines.append(f"pattern {_access_word(words)} {topic}")
        lines.append("")
    for name in sorted(users):
        block = users[name]
        if name == admin:
            lines.append("# The local kick channel (dynamic-security plugin, unix socket only).")
        elif name in active["service"]:
            lines.append(f"# service {name}")
        else:
            lines.append(f"# device {name}")
        lines.append(f"user {name}")
        for deny in block.denies:
            lines.append(f"topic deny {deny}")
        for topic, words in block.access.items():
            lines.append(f"topic {_access_word(words)} {topic}")
        lines.append("")
    if not pattern_access and not users:
        # Old Mosquitto treated an ACL file without rules as no ACL at all (CVE-2018-12550).
        lines += ["# The policy grants nothing.", f"user {ADMIN_USER}-none", "topic deny #", ""]
    return "\n".join(lines)


def dynsec_config(password: str) -> bytes:
    """A dynamic-security config whose only client is the kick channel's admin."""
    salt = secrets.token_bytes(12)
    iterations = 101  # what `mosquitto_ctrl dynsec init` writes in 2.0
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    topic = "$CONTROL/dynamic-security/#"
    doc = {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": False,
        },
        "clients": [
            {
                "username": ADMIN_USER,
                "textName": "iotauth kick channel",
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": iterations,
                "roles": [{"rolename": "iotauth-kick"}],
            }
        ],
        "groups": [],
        "roles": [
            {
                "rolename": "iotauth-kick",
                "acls": [
                    {"acltype": kind, "topic": topic, "allow": True}
                    for kind in (
                        "publishClientSend",
                        "publishClientReceive",
                        "subscribePattern",
                        "unsubscribePattern",
                    )
                ],
            }
        ],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def build_mosquitto(
    policy: Policy, inventory: Inventory, out: Path, options: dict[str, object]
) -> tuple[dict[str, ExportFile], dict[str, object], list[Note]]:
    """Files of the export directory, the manifest fields, and the notes."""
    host = options.get("host")
    port = int(str(options.get("port", 8883)))
    run_as = options.get("run_as")
    kick = bool(options.get("kick", True))
    plugin_opt = options.get("dynsec_plugin")
    plugin = Path(str(plugin_opt)) if plugin_opt else (find_dynsec_plugin() if kick else None)
    pid_file = Path(str(options.get("pid_file") or out / "mosquitto.pid"))
    socket = Path(str(options.get("admin_socket") or out / "admin.sock"))
    notes: list[Note] = []
    if kick and plugin is None:
        notes.append(
            Note(
                "info",
                "mosquitto_dynamic_security.so not found (give --dynsec-plugin PATH): without the "
                "kick channel a revoked device stays connected until Mosquitto restarts",
            )
        )
        kick = False
    if kick and len(str(socket)) > _SUN_PATH_MAX:
        msg = (
            f"the admin socket path {socket} is longer than {_SUN_PATH_MAX} bytes; "
            "give a shorter --admin-socket"
        )
        raise ExportError(msg)
    acl = translate_acl(policy, inventory, admin=ADMIN_USER if kick else None)
    notes += acl.notes

    general = [
        "# Generated by `iotauth broker export --format mosquitto`. Do not edit: re-export.",
        "# Start: mosquitto -c " + str(out / "mosquitto.conf"),
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {out / 'acl'}",
        f"pid_file {pid_file}",
        "set_tcp_nodelay true",
        "max_packet_size 262144",
    ]
    if run_as:
        general.append(f"user {run_as}")
    files: dict[str, ExportFile] = {}
    kick_manifest: dict[str, object] | None = None
    if kick:
        assert plugin is not None  # noqa: S101 - checked above
        password = secrets.token_urlsafe(24)
        general += [
            "",
            "# The kick channel: closes live sessions of revoked certificates (see README.md).",
            f"plugin {plugin}",
            f"plugin_opt_config_file {out / 'dynsec.json'}",
        ]
        files["dynsec.json"] = ExportFile(dynsec_config(password), 0o600)
        files["private/admin.password"] = ExportFile(password.encode() + b"\n", 0o600)
        kick_manifest = {
            "method": "mosquitto-dynsec",
            "socket": str(socket),
            "username": ADMIN_USER,
            "password_file": "private/admin.password",
        }
    listener = [
        "",
        "# Devices and services: mutual TLS; the user name is the certificate CN.",
        f"listener {port}{' ' + str(host) if host else ''}",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'server.crt'}",
        f"keyfile {out / 'server.key'}",
        f"crlfile {out / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
    ]
    if kick:
        listener += [
            "",
            "# Local only: the kick channel's admin (password in dynsec.json).",
            f"listener 0 {socket}",
        ]
    conf = "\n".join([*general, *listener, ""])
    files.update(
        {
            "mosquitto.conf": ExportFile(conf.encode()),
            "acl": ExportFile(acl.text.encode()),
            "ca.crt": ExportFile(inventory.root_pem + inventory.issuing_pem),
            "server.crt": ExportFile(inventory.server_chain_pem),
            "server.key": ExportFile(inventory.server_key_pem, 0o600),
            "crl.pem": ExportFile(inventory.crl_pem),
            "README.md": ExportFile(_readme(out, inventory, notes, kick, port, policy).encode()),
        }
    )
    manifest: dict[str, object] = {
        "crl": "crl.pem",
        "pid_file": str(pid_file),
        "kick": kick_manifest,
    }
    return files, manifest, notes


def _readme(
    out: Path, inventory: Inventory, notes: list[Note], kick: bool, port: int, policy: Policy
) -> str:
    noted = "\n".join(f"- {n}" for n in notes) or "- none: the policy is exported exactly."
    kick_text = (
        "`--reload` then closes the revoked identity's live sessions through the "
        "dynamic-security plugin (`mosquitto_ctrl dynsec disableClient` on the local admin "
        "socket; the admin password is in `private/admin.password`)."
        if kick
        else "This export has **no kick channel** (no dynamic-security plugin was found): a "
        "revoked device that is already connected **stays connected** until Mosquitto restarts. "
        "Restart it (`systemctl restart mosquitto`) after revoking, or re-export with "
        "`--dynsec-plugin PATH`."
    )
    return f"""# Mosquitto configuration for the {inventory.trust_domain} fleet

Generated by `iotauth broker export --format mosquitto` from `{inventory.pki_dir}` and the
policy `{policy.source}`. Re-run the export instead of editing these files (after issuing a
service, or changing the policy); it refreshes them in place.

Run it (the files must be readable, and this directory writable, by the user Mosquitto runs
as; started as root it drops to `mosquitto`, so `chown -R mosquitto {out}` first):

    mosquitto -c {out / "mosquitto.conf"}

- `mosquitto.conf`: the TLS listener on port {port} with `require_certificate`,
  `use_identity_as_username` (CN = device id), `use_username_as_clientid` (one session per
  certificate), `crlfile`, TLS >= 1.2; `set_tcp_nodelay`, 256 KiB packets, `pid_file`.
- `acl`: the policy, translated (`pattern` lines with `%u` for device rules, `user` blocks for
  services and named identities).
- `ca.crt`: fleet root + issuing CA; client certificates must chain to the root.
- `server.crt`, `server.key`: the broker certificate chain and its key (0600).
- `crl.pem`: the CRL; `iotauth device revoke ID --pki PKI --export {out} --reload` replaces it.
- `dynsec.json`, `private/`: the kick channel's admin (when enabled).
- `iotauth-export.json`: what the revoke hook reads.

## What was narrowed

{noted}

## Revocation

`iotauth device revoke dev-0007 --pki PKI --export {out} --reload` writes the new CRL here
(atomically) and sends SIGHUP to the pid in `pid_file`. Mosquitto re-reads `crlfile` on SIGHUP:
**new** TLS handshakes of the revoked certificate fail from then on. Mosquitto does **not**
re-check sessions that are already connected (measured with mosquitto 2.0.11: the revoked
client kept publishing and receiving after the reload). {kick_text}

## How Mosquitto differs from `iotauth broker run`

- Identity is the certificate CN only (the SAN URI is not checked; our CA always makes them
  agree). The client id is replaced by the CN instead of being refused when it differs.
- SUBSCRIBE is always acknowledged; Mosquitto filters every delivery (live, retained, will,
  queued) by the `read` grants instead. A device that subscribes to `#` receives only its own
  topics.
- A denied PUBLISH is dropped silently; the connection stays open.
- A certificate that expires while connected stays connected until it reconnects.
"""
