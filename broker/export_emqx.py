"""The EMQX 5 export: an ``emqx.conf`` fragment (HOCON), an ACL file (Erlang terms), certificates.

EMQX was not run while building this (none is installed here): the files follow EMQX 5's
documented syntax (listener ``ssl_options``, ``mqtt.peer_cert_as_username``, ``authorization``
with a ``file`` source, ``no_match = deny``) and the tests parse them against it.

Translation (first match wins in an EMQX ACL file):

1. each active service (and each identity a rule names): ``allow`` tuples with its literal
   filters, then a ``deny`` for everything else of that user name, so the device templates
   below never reach a service;
2. device and ``any`` rules: ``allow`` tuples for ``all`` with ``${cert_common_name}`` where the
   template says ``{name}``/``{device_id}``;
3. ``{deny, all}`` (and ``authorization.no_match = deny``).

EMQX authorises SUBSCRIBE by matching the requested filter against the rule's filter word by
word, so a rule ending in ``+`` (or ``+/#``) also admits ``#`` at that level, which is wider than
the rule. Such grants get a ``deny`` of the exact wider filter first when the part before the
``+`` has no wildcard; otherwise they are dropped with a warning.
"""

from __future__ import annotations

from pathlib import Path

from broker.export import ExportFile, Inventory, Note, render_filter
from broker.policy import Policy, Rule

__all__ = [
    "CN_PLACEHOLDER",
    "UNSUPPORTED_METHODS",
    "build_emqx",
    "erlang_string",
    "translate_acl",
]

CN_PLACEHOLDER = "${cert_common_name}"
# What EMQX 5's authenticators could do with our other methods, from its documentation and source
# (emqx_authn_jwt, emqx_authn_scram_mnesia, emqx_authn_mnesia); docs/EXPORT.md says more.
UNSUPPORTED_METHODS = {
    "jwt": (
        "EMQX's JWT authenticator checks every token against one key or one JWKS and does not "
        "bind the key that verified it to the sub claim, so any device's key would sign for any "
        "other; it also neither caps the lifetime nor remembers jti"
    ),
    "oidc": (
        "EMQX's JWT authenticator would take a provider token whose claim names any user, not "
        "only a registered service, and never learns of 'service revoke'"
    ),
    "scram": (
        "EMQX's scram authenticator makes its users' keys from the plaintext password (REST API) "
        "and refuses imports, and the registry holds only our verifier, never the secret"
    ),
    "password": (
        "EMQX's password_based built-in database compares its own hash of the password (plain, "
        "sha*, bcrypt or pbkdf2), and a SCRAM verifier is none of those"
    ),
}
_MARK = "\x00"


def erlang_string(value: str) -> str:
    """A double-quoted Erlang string literal (UTF-8; escapes for '"', '\\' and controls)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{{{ord(ch):X}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _widening_prefix(topic_filter: str) -> str | bool | None:
    """For a SUBSCRIBE grant: False if EMQX matches it exactly; else the exact wider filter to
    deny (``prefix/#``), or None when that cannot be written as one ``eq`` filter."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level == "+" and levels[index + 1 :] in ([], ["#"]):
            prefix = levels[:index]
            if any(p in ("+", "#") for p in prefix) or _MARK in "/".join(prefix):
                return None
            return "/".join([*prefix, "#"])
    return False


def _tuples(
    who: str, rule: Rule, topics: list[tuple[str, str, str]], notes: list[Note]
) -> tuple[list[str], list[str]]:
    """(deny tuples that must come first, allow tuples) for one rule and one subject."""
    denies: list[str] = []
    allows: list[str] = []
    for action in ("publish", "subscribe"):
        chosen: list[str] = []
        for kind, template, topic in topics:
            if kind != action:
                continue
            if action == "subscribe":
                wider = _widening_prefix(topic)
                if wider is None:
                    notes.append(
                        Note(
                            "warning",
                            f"subscribe {template!r} dropped: EMQX would also admit '#' in place "
                            "of its last '+', and the wider filter cannot be denied exactly",
                            rule.name,
                        )
                    )
                    continue
                if isinstance(wider, str):
                    eq = "{eq, " + erlang_string(wider.replace(_MARK, CN_PLACEHOLDER)) + "}"
                    denies.append(f"{{deny, {who}, subscribe, [{eq}]}}.")
            chosen.append(erlang_string(topic.replace(_MARK, CN_PLACEHOLDER)))
        if chosen:
            allows.append(f"{{allow, {who}, {action}, [{', '.join(chosen)}]}}.")
    return denies, allows


def _pairs(rule: Rule) -> list[tuple[str, str]]:
    return [("publish", t) for t in rule.publish] + [("subscribe", t) for t in rule.subscribe]


def translate_acl(policy: Policy, inventory: Inventory) -> tuple[str, list[Note]]:
    """The ``acl.conf`` text and the notes."""
    notes: list[Note] = []
    td = inventory.trust_domain
    active = {"device": set(inventory.devices), "service": set(inventory.services)}
    per_name: dict[str, tuple[list[str], list[str]]] = {}
    templated: list[str] = []
    templated_denies: list[str] = []
    device_templates: list[str] = []
    for rule in policy.rules:
        pairs = _pairs(rule)
        if rule.names is None and rule.kind in ("device", "any"):
            topics = [(a, t, render_filter(t, td, _MARK)) for a, t in pairs]
            if rule.kind == "device":
                device_templates += [topic for _, _, topic in topics]
            d, a = _tuples("all", rule, topics, notes)
            templated_denies += d
            templated += a
            continue
        kinds = ("device", "service") if rule.kind == "any" else (rule.kind,)
        targets = sorted(n for k in kinds for n in active[k] if not rule.names or n in rule.names)
        for missing in sorted(set(rule.names or ()) - set(targets)):
            notes.append(
                Note("info", f"no active identity {missing!r}: nothing exported for it", rule.name)
            )
        for name in targets:
            who = "{username, " + erlang_string(name) + "}"
            topics = [(a, t, render_filter(t, td, name)) for a, t in pairs]
            d, a = _tuples(who, rule, topics, notes)
            slot = per_name.setdefault(name, ([], []))
            slot[0].extend(d)
            slot[1].extend(a)
    # 'any' templates apply to services as well: give them literally inside the service block.
    for rule in policy.rules:
        if rule.names is None and rule.kind == "any":
            for name in sorted(active["service"]):
                who = "{username, " + erlang_string(name) + "}"
                topics = [(a, t, render_filter(t, td, name)) for a, t in _pairs(rule)]
                d, a = _tuples(who, rule, topics, [])
                slot = per_name.setdefault(name, ([], []))
                slot[0].extend(d)
                slot[1].extend(a)
    lines = [
        "%% Generated by `iotauth broker export --format emqx`. Do not edit: re-export.",
        f"%% Trust domain {td}. The user name is the client certificate's CN",
        "%% (mqtt.peer_cert_as_username = cn). First match wins; no match is a deny.",
        "",
    ]
    for name in sorted(per_name):
        kind = "service" if name in active["service"] else "device"
        lines.append(f"%% {kind} {name}")
        denies, allows = per_name[name]
        lines += denies + allows
        if kind == "service":
            who = "{username, " + erlang_string(name) + "}"
            own = [t.replace(_MARK, name) for t in device_templates]
            cover = ", ".join(erlang_string(t) for t in dict.fromkeys(["#", *own]))
            lines.append(f"{{deny, {who}, all, [{cover}]}}.")
        lines.append("")
    if templated:
        lines.append("%% Templates: every other client, with its certificate CN.")
        lines += templated_denies + templated + [""]
    lines += ["{deny, all}.", ""]
    return "\n".join(lines), notes


def _hocon_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_emqx(
    policy: Policy, inventory: Inventory, out: Path, options: dict[str, object]
) -> tuple[dict[str, ExportFile], dict[str, object], list[Note]]:
    etc = Path(str(options.get("emqx_dir") or "/etc/emqx/iotauth"))
    port = int(str(options.get("port", 8883)))
    host = str(options.get("host") or "0.0.0.0")  # noqa: S104 - a broker listens for the fleet
    acl_text, notes = translate_acl(policy, inventory)
    conf = f"""# Generated by `iotauth broker export --format emqx`. Do not edit: re-export.
# Append to etc/emqx.conf (or base.hocon) on every node; copy this directory to {etc}.

listeners.ssl.default {{
  bind = {_hocon_string(f"{host}:{port}")}
  ssl_options {{
    cacertfile = {_hocon_string(str(etc / "certs" / "ca.crt"))}
    certfile = {_hocon_string(str(etc / "certs" / "server.crt"))}
    keyfile = {_hocon_string(str(etc / "certs" / "server.key"))}
    verify = verify_peer
    fail_if_no_peer_cert = true
    versions = ["tlsv1.3", "tlsv1.2"]
    enable_crl_check = true
  }}
}}

# No plaintext or websocket way in: identity comes only from a verified certificate.
listeners.tcp.default {{ enable = false }}
listeners.ws.default {{ enable = false }}
listeners.wss.default {{ enable = false }}

mqtt {{
  peer_cert_as_username = cn
  peer_cert_as_clientid = cn
  max_packet_size = 256KB
}}

authorization {{
  no_match = deny
  deny_action = disconnect
  cache {{ enable = false }}
  sources = [
    {{
      type = file
      enable = true
      path = {_hocon_string(str(etc / "acl.conf"))}
    }}
  ]
}}
"""
    files = {
        "emqx.conf": ExportFile(conf.encode()),
        "acl.conf": ExportFile(acl_text.encode()),
        "certs/ca.crt": ExportFile(inventory.root_pem + inventory.issuing_pem),
        "certs/server.crt": ExportFile(inventory.server_chain_pem),
        "certs/server.key": ExportFile(inventory.server_key_pem, 0o600),
        "certs/crl.pem": ExportFile(inventory.crl_pem),
        "README.md": ExportFile(_readme(inventory, etc, notes, port).encode()),
    }
    notes.append(
        Note(
            "info",
            "EMQX checks CRLs only from the CRL distribution point named in client certificates "
            "(our certificates carry none): revoke through EMQX's ban list as README.md shows",
        )
    )
    return files, {"crl": "certs/crl.pem", "pid_file": None, "kick": None}, notes


def _readme(inventory: Inventory, etc: Path, notes: list[Note], port: int) -> str:
    noted = "\n".join(f"- {n}" for n in notes) or "- none: the policy is exported exactly."
    return f"""# EMQX 5 configuration for the {inventory.trust_domain} fleet

Generated by `iotauth broker export --format emqx`. **Not run against a live EMQX** (none was
available where it was built); the files follow EMQX 5's documented syntax and the project's
tests parse them. Try it on a staging node before production.

- `emqx.conf`: the mTLS listener (`verify = verify_peer`, `fail_if_no_peer_cert = true`,
  `enable_crl_check = true`) on port {port}, plaintext/websocket listeners off,
  `peer_cert_as_username = cn` and `peer_cert_as_clientid = cn`, and the authorization file
  source with `no_match = deny`.
- `acl.conf`: the policy as EMQX ACL tuples (`${{cert_common_name}}` for the device id).
- `certs/`: `ca.crt` (root + issuing CA), `server.crt`, `server.key` (0600), `crl.pem`.

## A 3-node cluster

1. Issue the broker certificate for the name clients use (`iotauth ca init ... --server-name
   mqtt.example.com`); all three nodes serve the same `server.crt`/`server.key`.
2. On each node (`emqx@node1.example.com`, `emqx@node2...`, `emqx@node3...`): copy this
   directory to `{etc}`, append `emqx.conf` to `etc/emqx.conf`, and set the same cookie and
   static discovery:

       node.name = "emqx@node1.example.com"
       node.cookie = "<one long random secret, the same on every node>"
       cluster.discovery_strategy = static
       cluster.static.seeds = ["emqx@node1.example.com", "emqx@node2.example.com",
                               "emqx@node3.example.com"]

3. Start the nodes and check `emqx ctl cluster status` lists three running nodes.
4. Put a **TCP pass-through** load balancer on port {port} in front (no TLS termination: the
   nodes must see the client certificate; if the balancer must terminate TLS, forward the
   certificate with PROXY protocol v2 and enable `proxy_protocol` on the listener).
5. Keep inter-node ports (4370, 5370) on a private network.

After a policy change or a new service, re-export and copy `acl.conf` to every node, then
reload the file source (Dashboard: Access Control > Authorization, or restart).

## Revocation

EMQX's CRL check fetches CRLs from the distribution point URL inside each client certificate
and needs the CRL to carry an Issuing Distribution Point extension; our certificates name no
distribution point, so `enable_crl_check` alone does not stop a revoked certificate. Until
the PKI adds them, revoke in EMQX too, by user name (= CN), which also refuses reconnects:

    curl -u KEY:SECRET -X POST http://NODE:18083/api/v5/banned \\
      -H 'Content-Type: application/json' \\
      -d '{{"as": "username", "who": "dev-0007", "reason": "certificate revoked"}}'
    curl -u KEY:SECRET -X DELETE http://NODE:18083/api/v5/clients/dev-0007

EMQX checks revocation only at the handshake (emqx/emqx #10992): the DELETE is what closes a
live session. Lift the ban before re-issuing that device id.

## What was narrowed

{noted}
"""
