"""The EMQX 5 export, checked against EMQX's documented syntax and semantics (no EMQX runs here).

- ``acl.conf`` is parsed as Erlang terms and every term must have a documented shape
  (``{allow|deny, Who, Action, Topics}`` or ``{allow|deny, all}``, placeholders EMQX knows).
- Its meaning is evaluated the way EMQX 5 does (emqx_authz_rule: first match wins, topics via
  emqx_topic:match word by word, ``$`` topics never matched by a leading wildcard) and compared
  with our policy: the exported file may allow only what the policy allows.
- ``emqx.conf`` is parsed as HOCON (the subset it uses) and the documented keys are checked.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from broker.export import export, load_inventory
from broker.export_emqx import translate_acl
from broker.policy import Action, Policy, _parse, default_policy
from provisioning.identity import Identity, IdentityKind
from tests.broker.broker_helpers import Fleet

# -- a small Erlang term reader (what file:consult/1 would accept, for the shapes used) ------------

_TOKEN = re.compile(
    r'\s+|%[^\n]*|(?P<str>"(?:[^"\\]|\\.)*")|(?P<atom>[a-z][A-Za-z0-9_@]*)|(?P<p>[{}\[\],.])'
)


class Atom(str):
    pass


def _tokens(text: str) -> list[str | Atom]:
    out: list[str | Atom] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"not Erlang at {text[pos : pos + 30]!r}"
        pos = m.end()
        if m["str"]:
            body = m["str"][1:-1]
            out.append(re.sub(r"\\(.)", r"\1", body))
        elif m["atom"]:
            out.append(Atom(m["atom"]))
        elif m["p"]:
            out.append(Atom("#" + m["p"]))
    return out


def consult(text: str) -> list[Any]:
    """Parse a sequence of terms each ending with '.' into tuples, lists, str and Atom."""
    toks = _tokens(text)
    terms: list[Any] = []

    def value(i: int) -> tuple[Any, int]:
        tok = toks[i]
        if tok in ("#{", "#["):
            close = "#}" if tok == "#{" else "#]"
            items: list[Any] = []
            i += 1
            while toks[i] != close:
                item, i = value(i)
                items.append(item)
                if toks[i] == "#,":
                    i += 1
                else:
                    assert toks[i] == close, toks[i]
            return (tuple(items) if close == "#}" else items), i + 1
        assert not (isinstance(tok, Atom) and tok.startswith("#")), f"unexpected {tok}"
        return tok, i + 1

    i = 0
    while i < len(toks):
        term, i = value(i)
        assert toks[i] == "#.", "a term must end with '.'"
        terms.append(term)
        i += 1
    return terms


_PLACEHOLDERS = {"${username}", "${clientid}", "${cert_common_name}"}


def _check_shape(term: Any) -> None:
    assert isinstance(term, tuple), term
    assert term[0] in ("allow", "deny"), term
    if len(term) == 2:
        assert term[1] == "all"
        return
    assert len(term) == 4, term
    _, who, action, topics = term
    assert who == "all" or (
        isinstance(who, tuple) and len(who) == 2 and who[0] in ("username", "clientid")
    ), who
    assert action in ("publish", "subscribe", "all"), action
    assert isinstance(topics, list), topics
    assert topics, term
    for topic in topics:
        literal = topic[1] if isinstance(topic, tuple) else topic
        assert isinstance(topic, str) or topic[0] == "eq", topic
        for ph in re.findall(r"\$\{[^}]*\}", literal):
            assert ph in _PLACEHOLDERS, ph


# -- EMQX 5 semantics ------------------------------------------------------------------------------


def _emqx_words_match(name: list[str], flt: list[str]) -> bool:
    if not name and not flt:
        return True
    if name and flt and name[0] == flt[0]:
        return _emqx_words_match(name[1:], flt[1:])
    if name and flt and flt[0] == "+":
        return _emqx_words_match(name[1:], flt[1:])
    return flt == ["#"]


def emqx_match(topic: str, flt: str) -> bool:
    name, f = topic.split("/"), flt.split("/")
    if name[0].startswith("$") and f[0] in ("+", "#"):
        return False
    return _emqx_words_match(name, f)


def emqx_allows(terms: list[Any], username: str, action: str, topic: str) -> bool:
    for term in terms:
        if len(term) == 2:
            return term[0] == "allow"
        perm, who, act, topics = term
        if act not in (action, "all"):
            continue
        if who != "all" and who[1] != username:
            continue
        for t in topics:
            if isinstance(t, tuple):
                hit = t[1] == topic
            else:
                hit = emqx_match(topic, t.replace("${cert_common_name}", username))
            if hit:
                return bool(perm == "allow")
    return False  # authorization.no_match = deny


TOPIC_LEVELS = ["devices", "dev-1", "dev-2", "sink", "renewal", "telemetry", "certs", "csr", "$SYS"]
FILTER_LEVELS = [*TOPIC_LEVELS, "+", "#"]


def _samples(levels: list[str], *, filters: bool) -> list[str]:
    out = []
    for n in (1, 2, 3, 4):
        for combo in itertools.product(levels, repeat=n):
            if filters and any(lv == "#" for lv in combo[:-1]):
                continue
            if combo[0] != "devices" and n > 2:
                continue  # keep the sample small: deep topics outside devices/ add nothing
            out.append("/".join(combo))
    return out


TOPICS = _samples(TOPIC_LEVELS, filters=False)
FILTERS = _samples(FILTER_LEVELS, filters=True)


def _never_wider(policy: Policy, fleet: Fleet, who: list[Identity]) -> tuple[int, list[Any]]:
    inventory = load_inventory(fleet.pki_dir)
    text, _ = translate_acl(policy, inventory)
    terms = consult(text)
    allowed = 0
    for identity in who:
        for action, samples in ((Action.PUBLISH, TOPICS), (Action.SUBSCRIBE, FILTERS)):
            for t in samples:
                if emqx_allows(terms, identity.name, action.value, t):
                    allowed += 1
                    decision = policy.decide(identity, action, t)
                    assert decision.allowed, f"EMQX would allow {identity} {action.value} {t}"
    return allowed, terms


@pytest.fixture
def who(fleet: Fleet) -> list[Identity]:
    fleet.creds("renewal", service=True)
    td = fleet.pki.trust_domain
    return [
        Identity(IdentityKind.DEVICE, "dev-1", td),
        Identity(IdentityKind.DEVICE, "dev-2", td),
        Identity(IdentityKind.SERVICE, "sink", td),
        Identity(IdentityKind.SERVICE, "renewal", td),
    ]


def test_acl_conf_has_documented_shapes_and_is_never_wider(
    fleet: Fleet, who: list[Identity]
) -> None:
    allowed, terms = _never_wider(default_policy(), fleet, who)
    for term in terms:
        _check_shape(term)
    assert terms[-1] == ("deny", "all")
    assert allowed > 100  # not vacuous: the sample exercises real grants
    # and it is not narrower for the default policy: spot checks of every table row
    assert emqx_allows(terms, "dev-1", "publish", "devices/dev-1/telemetry/t")
    assert emqx_allows(terms, "dev-1", "subscribe", "devices/dev-1/#")
    assert emqx_allows(terms, "sink", "subscribe", "devices/+/telemetry/#")
    assert emqx_allows(terms, "sink", "publish", "devices/dev-1/commands/reboot")
    assert emqx_allows(terms, "renewal", "subscribe", "devices/+/certs/csr")
    assert not emqx_allows(terms, "sink", "publish", "devices/sink/telemetry/t")
    assert not emqx_allows(terms, "dev-1", "subscribe", "#")


def test_a_trailing_plus_grant_is_guarded_or_dropped(fleet: Fleet, who: list[Identity]) -> None:
    """EMQX lets '#' match a rule's '+' at the last level: export an exact deny, or drop."""
    policy = _parse(
        "version = 1\n"
        '[[rule]]\nname = "list"\nkind = "service"\nsubscribe = ["devices/+", "a/+/b/+"]\n'
        '[[rule]]\nname = "own"\nkind = "device"\nsubscribe = ["devices/{device_id}/+"]\n',
        source="t.toml",
    )
    inventory = load_inventory(fleet.pki_dir)
    text, notes = translate_acl(policy, inventory)
    assert '{deny, {username, "sink"}, subscribe, [{eq, "devices/#"}]}.' in text
    dropped = {n.message.split(" dropped")[0] for n in notes if n.level == "warning"}
    assert dropped == {"subscribe 'a/+/b/+'", "subscribe 'devices/{device_id}/+'"}
    _never_wider(policy, fleet, who)
    # The failing twin: without the guard EMQX would admit 'devices/#', which the policy refuses.
    guard = '{deny, {username, "sink"}, subscribe, [{eq, "devices/#"}]}.'
    assert emqx_allows(consult(text.replace(guard, "")), "sink", "subscribe", "devices/#")
    assert not policy.decide(who[2], Action.SUBSCRIBE, "devices/#").allowed


# -- emqx.conf (HOCON) -----------------------------------------------------------------------------

_HOCON = re.compile(
    r'[ \t]+|#[^\n]*|(?P<nl>\n)|(?P<str>"(?:[^"\\]|\\.)*")'
    r'|(?P<p>[{}\[\]=,])|(?P<w>[^\s{}\[\]=,#"]+)'
)


def hocon(text: str) -> dict[str, Any]:
    """The HOCON subset emqx.conf uses: objects, dotted keys, arrays, strings, bare words."""
    toks: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _HOCON.match(text, pos)
        assert m, f"not HOCON at {text[pos : pos + 30]!r}"
        pos = m.end()
        kind = m.lastgroup
        if kind is not None:
            toks.append((kind, m[kind]))
    i = 0

    def skip_nl() -> None:
        nonlocal i
        while i < len(toks) and toks[i][0] == "nl":
            i += 1

    def value() -> Any:
        nonlocal i
        kind, tok = toks[i]
        if tok == "{":
            i += 1
            return obj("}")
        if tok == "[":
            i += 1
            items = []
            skip_nl()
            while toks[i][1] != "]":
                items.append(value())
                skip_nl()
                if toks[i][1] == ",":
                    i += 1
                    skip_nl()
            i += 1
            return items
        i += 1
        if kind == "str":
            return tok[1:-1]
        return {"true": True, "false": False}.get(tok, tok)

    def obj(close: str | None) -> dict[str, Any]:
        nonlocal i
        out: dict[str, Any] = {}
        while True:
            skip_nl()
            if i >= len(toks) or toks[i][1] == close:
                i += 1
                return out
            kind, key = toks[i]
            assert kind in ("w", "str"), f"key expected, got {key!r}"
            i += 1
            if toks[i][1] == "=":
                i += 1
            else:
                assert toks[i][1] == "{", f"'=' or '{{' expected after {key}"
            val = value()
            node = out
            parts = key.strip('"').split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            if isinstance(val, dict) and isinstance(node.get(parts[-1]), dict):
                node[parts[-1]].update(val)
            else:
                node[parts[-1]] = val
            if i < len(toks) and toks[i][1] == ",":
                i += 1

    return obj(None)


def test_emqx_conf_has_the_documented_mtls_and_authorization_settings(
    fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "emqx"
    result = export(
        default_policy(), load_inventory(fleet.pki_dir), out, fmt="emqx",
        options={"emqx_dir": "/etc/emqx/iotauth", "port": 8883},
    )  # fmt: skip
    conf = hocon((out / "emqx.conf").read_text())
    ssl = conf["listeners"]["ssl"]["default"]
    assert ssl["bind"] == "0.0.0.0:8883"
    opts = ssl["ssl_options"]
    assert opts["verify"] == "verify_peer"
    assert opts["fail_if_no_peer_cert"] is True
    assert opts["enable_crl_check"] is True
    assert opts["cacertfile"] == "/etc/emqx/iotauth/certs/ca.crt"
    for name in ("tcp", "ws", "wss"):
        assert conf["listeners"][name]["default"]["enable"] is False
    assert conf["mqtt"]["peer_cert_as_username"] == "cn"
    assert conf["mqtt"]["peer_cert_as_clientid"] == "cn"
    authz = conf["authorization"]
    assert authz["no_match"] == "deny"
    assert authz["sources"] == [
        {"type": "file", "enable": True, "path": "/etc/emqx/iotauth/acl.conf"}
    ]
    assert (out / "certs" / "server.key").stat().st_mode & 0o777 == 0o600
    readme = (out / "README.md").read_text()
    assert "Not run against a live EMQX" in readme
    assert "cluster.static.seeds" in readme
    assert any("distribution point" in str(n) for n in result.notes)
