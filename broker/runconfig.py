"""``iotauth broker run --config FILE``: the listeners, the methods each kind may use, and the
identity provider, in one TOML file instead of on the command line.

    version = 1
    listen = ["8883:mtls", "8884:jwt,oidc,password"]   # as --listen, one string per listener

    [methods]                    # which methods each kind of identity may use (narrower only)
    device = ["mtls", "jwt"]
    service = ["mtls", "oidc", "password"]

    [tokens]                     # device tokens (jwt), as --token-audience, --token-max-ttl
    audience = "mqtt.fleet.example"
    max_ttl = 3600

    [oidc]                       # as --oidc-*; needed when a listener lists oidc
    issuer = "https://idp.example.com/"
    audience = "mqtt"
    jwks = "https://idp.example.com/.well-known/jwks.json"   # or a file
    claim = "sub"
    cafile = "idp-ca.pem"        # a relative path is relative to this file

Every key is optional. The command line wins: ``--listen`` replaces ``listen``, any
``--oidc-*`` option replaces the ``[oidc]`` table, ``--token-*`` the key of ``[tokens]``.
``[methods]`` may only narrow the defaults (``DEFAULT_METHODS_BY_KIND``): a device has no secret
and no identity provider names it, a service signs no device token, so a wider list could never
work and is refused rather than ignored. An unknown key is refused too: a typo must not leave a
listener with other methods than intended.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.auth_oidc import OIDCSettings
from broker.errors import ConfigError
from broker.settings import DEFAULT_METHODS_BY_KIND, ListenerSpec

__all__ = ["RunConfig", "load_run_config"]

_OIDC_KEYS = ("issuer", "audience", "jwks", "claim", "cafile")
_Fail = Callable[[str], ConfigError]


@dataclass(frozen=True, slots=True)
class RunConfig:
    """What a config file sets; empty or None where it says nothing (the defaults apply)."""

    listeners: tuple[ListenerSpec, ...] = ()
    methods_by_kind: dict[str, frozenset[str]] | None = None
    oidc: OIDCSettings | None = None
    token_audience: str | None = None
    token_max_ttl: int | None = None


def load_run_config(path: Path) -> RunConfig:
    """Read and check ``path``; ConfigError names the file, the key and the fix."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None

    def fail(what: str) -> ConfigError:
        return ConfigError(f"{path}: {what}")

    _only(doc, ("version", "listen", "methods", "tokens", "oidc"), "", fail)
    if doc.get("version", 1) != 1:
        raise fail(f"version {doc['version']!r} is not supported (use version = 1)")
    listen = doc.get("listen", [])
    if not isinstance(listen, list) or not all(isinstance(x, str) for x in listen):
        raise fail('listen must be a list of "PORT:METHOD[,METHOD...]" strings, e.g. ["8883:mtls"]')
    try:
        listeners = tuple(ListenerSpec.parse(text) for text in listen)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    tokens = doc.get("tokens", {})
    if not isinstance(tokens, dict):
        raise fail("[tokens] must be a table: audience, max_ttl")
    _only(tokens, ("audience", "max_ttl"), "in [tokens] ", fail)
    audience, max_ttl = tokens.get("audience"), tokens.get("max_ttl")
    if audience is not None and (not isinstance(audience, str) or not audience):
        raise fail("[tokens] audience must be a non-empty string")
    if max_ttl is not None and (
        not isinstance(max_ttl, int) or isinstance(max_ttl, bool) or not 0 < max_ttl <= 86400
    ):
        raise fail("[tokens] max_ttl must be a number of seconds from 1 to 86400")
    return RunConfig(
        listeners=listeners,
        methods_by_kind=_methods(doc.get("methods"), fail),
        oidc=_oidc(doc.get("oidc"), path.parent, fail),
        token_audience=audience,
        token_max_ttl=max_ttl,
    )


def _only(table: Mapping[str, Any], keys: tuple[str, ...], where: str, fail: _Fail) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        msg = f"unknown key {where}{unknown[0]!r} (known: {', '.join(keys)})"
        raise fail(msg)


def _methods(table: object, fail: _Fail) -> dict[str, frozenset[str]] | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise fail("[methods] must be a table: device = [...], service = [...]")
    _only(table, tuple(DEFAULT_METHODS_BY_KIND), "in [methods] ", fail)
    chosen = dict(DEFAULT_METHODS_BY_KIND)
    for kind, names in table.items():
        allowed = DEFAULT_METHODS_BY_KIND[kind]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"[methods] {kind} must be a list of method names")
        wider = sorted(set(names) - allowed)
        if wider:
            raise fail(
                f"[methods] {kind}: {', '.join(wider)} is not a method a {kind} can use "
                f"(choose from {', '.join(sorted(allowed))})"
            )
        chosen[kind] = frozenset(names)
    return chosen


def _oidc(table: object, base: Path, fail: _Fail) -> OIDCSettings | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise fail("[oidc] must be a table: issuer, audience, jwks[, claim, cafile]")
    _only(table, _OIDC_KEYS, "in [oidc] ", fail)
    if not all(isinstance(v, str) for v in table.values()):
        raise fail("[oidc] values must be strings")
    jwks = table.get("jwks", "")
    if jwks and "://" not in jwks and not Path(jwks).is_absolute():
        jwks = str(base / jwks)
    cafile = table.get("cafile")
    try:
        return OIDCSettings(
            issuer=table.get("issuer", ""),
            audience=table.get("audience", ""),
            jwks=jwks,
            claim=table.get("claim", "sub"),
            cafile=(base / cafile) if cafile else None,
        )
    except ConfigError as exc:
        raise fail(f"[oidc]: {exc}") from None
