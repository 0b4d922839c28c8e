"""Who may publish and subscribe where: TOML rules that are templates over the identity.

Deny by default. A rule grants PUBLISH on topic names matched by its ``publish`` filters and
SUBSCRIBE on filters *contained* in its ``subscribe`` filters; a message is delivered (RECEIVE)
only on topics its subscriber's ``subscribe`` grants match, so retained, queued and will
messages obey the same table as live ones. Every decision names the rule that made it, which is
what ``iotauth broker explain`` prints.

File format (``version = 1``; see docs/BROKER.md)::

    version = 1

    [[rule]]
    name = "device-subtree"          # unique, shown by `explain` and in audit lines
    kind = "device"                  # "device" | "service" | "any"
    names = ["dev-0001"]             # optional: only these device ids / service names
    publish = ["devices/{device_id}/#"]
    subscribe = ["devices/{device_id}/#"]

Placeholders: ``{name}`` (device id or service name), ``{device_id}`` (device rules only) and
``{trust_domain}``. Substituted values are validated identities, so they can never inject ``+``,
``#`` or ``/`` into a filter.
"""

from __future__ import annotations

import enum
import functools
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.errors import PolicyError, TopicError
from broker.topics import contains, is_wildcard, matches, validate_filter, validate_topic
from provisioning.identity import Identity, validate_name

__all__ = [
    "DEFAULT_POLICY_TOML",
    "Action",
    "Decision",
    "Grants",
    "Policy",
    "Rule",
    "default_policy",
    "load_policy",
]

DEFAULT_POLICY_TOML = """\
# The default policy: the topic table of docs/ARCHITECTURE.md. Deny by default; rules only grant.
version = 1

[[rule]]
name = "device-subtree"
kind = "device"
publish = ["devices/{device_id}/#"]
subscribe = ["devices/{device_id}/#"]

[[rule]]
name = "service-fleet-io"
kind = "service"
publish = ["devices/+/commands/#"]
subscribe = ["devices/+/telemetry/#", "devices/+/state", "devices/+/replies/#"]

[[rule]]
name = "renewal-service"
kind = "service"
names = ["renewal"]
publish = ["devices/+/certs/issued"]
subscribe = ["devices/+/certs/csr"]
"""

_PLACEHOLDERS = frozenset({"name", "device_id", "trust_domain"})
_RULE_KEYS = frozenset({"name", "kind", "names", "publish", "subscribe"})
_KINDS = ("device", "service", "any")


class Action(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``: templates, not yet bound to an identity."""

    name: str
    kind: str
    names: tuple[str, ...] | None
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def applies_to(self, identity: Identity) -> bool:
        if self.kind not in ("any", identity.kind.value):
            return False
        return self.names is None or identity.name in self.names


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may <identity> <action> <topic>?" and why."""

    allowed: bool
    action: Action
    topic: str
    identity: Identity
    rule: str | None = None
    grant: str | None = None
    reason: str = ""

    def describe(self) -> str:
        verdict = "ALLOW" if self.allowed else "DENY"
        who = f"{self.identity.kind.value} {self.identity.name}"
        head = f"{verdict}: {who} {self.action.value} {self.topic!r}"
        if self.allowed:
            return f"{head}\n  by rule {self.rule!r}: {self.grant!r} {self.reason}"
        return f"{head}\n  {self.reason}"


@dataclass(frozen=True, slots=True)
class _Grant:
    rule: str
    template: str
    topic_filter: str


class Grants:
    """A policy bound to one identity: concrete filters, checked per message without templating."""

    def __init__(self, identity: Identity, publish: list[_Grant], subscribe: list[_Grant]) -> None:
        self.identity = identity
        self._publish = tuple(publish)
        self._subscribe = tuple(subscribe)

    def decide(self, action: Action, topic: str) -> Decision:
        try:
            if action is Action.SUBSCRIBE:
                validate_filter(topic)
            else:
                validate_topic(topic)
        except TopicError as exc:
            return Decision(False, action, topic, self.identity, reason=exc.reason)
        test: Callable[[str, str], bool]
        if action is Action.PUBLISH:
            grants, test, how = self._publish, matches, "matches the topic"
        elif action is Action.RECEIVE:
            grants, test, how = self._subscribe, matches, "matches the topic"
        else:
            grants, test, how = self._subscribe, contains, "contains every topic of the filter"
        for grant in grants:
            if test(grant.topic_filter, topic):
                return Decision(
                    True, action, topic, self.identity, grant.rule, grant.topic_filter, how
                )
        return Decision(False, action, topic, self.identity, reason=self._why_not(action, topic))

    def allows(self, action: Action, topic: str) -> bool:
        """The hot path (every delivered message): no Decision object, no validation."""
        if action is Action.PUBLISH:
            return any(matches(g.topic_filter, topic) for g in self._publish)
        if action is Action.RECEIVE:
            return any(matches(g.topic_filter, topic) for g in self._subscribe)
        return any(contains(g.topic_filter, topic) for g in self._subscribe)

    def _why_not(self, action: Action, topic: str) -> str:
        grants = self._publish if action is Action.PUBLISH else self._subscribe
        if not grants:
            return f"denied by default: no rule grants {action.value} to this identity"
        listed = ", ".join(repr(g.topic_filter) for g in grants)
        if action is Action.SUBSCRIBE and is_wildcard(topic):
            return (
                f"denied by default: no granted filter contains every topic of {topic!r} "
                f"(granted: {listed})"
            )
        return f"denied by default: no granted filter matches (granted: {listed})"


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str = "<default>"

    def for_identity(self, identity: Identity) -> Grants:
        return _bind(self, identity)

    def decide(self, identity: Identity, action: Action, topic: str) -> Decision:
        return self.for_identity(identity).decide(action, topic)


# Bound grants are cached per (policy, identity): both are frozen and hashable, and binding is
# done once per connection instead of once per message.
@functools.lru_cache(maxsize=4096)
def _bind(policy: Policy, identity: Identity) -> Grants:
    values = {
        "name": identity.name,
        "device_id": identity.name,
        "trust_domain": identity.trust_domain,
    }
    publish: list[_Grant] = []
    subscribe: list[_Grant] = []
    for rule in policy.rules:
        if not rule.applies_to(identity):
            continue
        publish += [_Grant(rule.name, t, t.format_map(values)) for t in rule.publish]
        subscribe += [_Grant(rule.name, t, t.format_map(values)) for t in rule.subscribe]
    return Grants(identity, publish, subscribe)


def default_policy() -> Policy:
    return _parse(DEFAULT_POLICY_TOML, source="<default>")


def load_policy(path: Path | None) -> Policy:
    """Load a policy file; ``None`` means the default policy. Raises PolicyError."""
    if path is None:
        return default_policy()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror or exc}", path=str(path)) from None
    return _parse(text, source=str(path))


def _parse(text: str, *, source: str) -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(str(exc), path=source) from None
    unknown = set(doc) - {"version", "rule"}
    if unknown:
        raise PolicyError(f"unknown top-level key(s): {', '.join(sorted(unknown))}", path=source)
    if doc.get("version") != 1:
        raise PolicyError("missing 'version = 1'", path=source)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise PolicyError("'rule' must be an array of tables ([[rule]])", path=source)
    rules = tuple(_parse_rule(r, index, source) for index, r in enumerate(raw_rules, 1))
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise PolicyError("duplicate rule name", path=source, rule=rule.name)
        seen.add(rule.name)
    return Policy(rules, source)


def _parse_rule(raw: dict[str, object], index: int, source: str) -> Rule:
    name = raw.get("name", f"#{index}")
    if not isinstance(name, str) or not name:
        raise PolicyError("'name' must be a non-empty string", path=source, rule=f"#{index}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PolicyError(f"unknown key(s): {', '.join(sorted(unknown))}", path=source, rule=name)
    kind = raw.get("kind")
    if kind not in _KINDS:
        raise PolicyError(f"'kind' must be one of {', '.join(_KINDS)}", path=source, rule=name)
    assert isinstance(kind, str)  # noqa: S101 - narrowed by the membership test above
    names: tuple[str, ...] | None = None
    if "names" in raw:
        names = _strings(raw["names"], "names", source, name)
        for value in names:
            try:
                validate_name(value, what="name")
            except ValueError as exc:
                raise PolicyError(str(exc), path=source, rule=name) from None
    publish = _strings(raw.get("publish", []), "publish", source, name)
    subscribe = _strings(raw.get("subscribe", []), "subscribe", source, name)
    for template in publish + subscribe:
        _check_template(template, kind, source, name)
    return Rule(name, kind, names, publish, subscribe)


def _strings(value: object, key: str, source: str, rule: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"'{key}' must be a list of strings", path=source, rule=rule)
    return tuple(value)


def _check_template(template: str, kind: str, source: str, rule: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise PolicyError(f"bad template {template!r}: {exc}", path=source, rule=rule) from None
    bad = fields - _PLACEHOLDERS
    if bad:
        raise PolicyError(
            f"unknown placeholder(s) {', '.join(sorted(bad))} in {template!r}; "
            "use {name}, {device_id} or {trust_domain}",
            path=source,
            rule=rule,
        )
    if "device_id" in fields and kind != "device":
        raise PolicyError(
            f'{{device_id}} in {template!r} needs kind = "device"', path=source, rule=rule
        )
    # A valid sample identity must yield a valid filter; real names are validated the same way.
    sample = template.format_map({"name": "x", "device_id": "x", "trust_domain": "d.example"})
    try:
        validate_filter(sample)
    except TopicError as exc:
        raise PolicyError(f"{template!r}: {exc.reason}", path=source, rule=rule) from None
