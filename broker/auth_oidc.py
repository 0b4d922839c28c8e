"""The ``oidc`` method: a service comes in with an access token from its identity provider.

The MQTT password is a JWT access token (RFC 9068 style) signed by the identity provider. The
broker is configured with the issuer, the audience, the JWKS source (a file, or an https URL
fetched with a timeout, cached, and fetched again when a token names an unknown ``kid``) and the
claim that names the service. What it checks, in order, each failure its own audit reason:

1. the header's ``alg`` is on the allow-list (RS256, ES256): ``none``, HS* (a shared secret, or
   the provider's public key misused as one) and anything else are refused before a key is looked
   up; the header has no ``x5c`` (that is a device token, the ``jwt`` method);
2. the ``kid`` is in the JWKS (an unknown one makes one fresh fetch, at most every
   ``refresh_cooldown`` seconds, so random ``kid`` values cannot make the broker hammer the
   provider); the key's type fits ``alg``. A JWKS that cannot be fetched refuses the connection
   (fail closed, ``oidc-jwks-unreachable``); a key removed from the JWKS is refused from the next
   fetch on;
3. PyJWT verifies the signature, ``iss``, ``aud``, ``exp`` (and ``nbf``/``iat``) with a bounded
   clock skew;
4. the claim names a service that is registered (a certificate or a secret) and not revoked;
   the session gets that service's ACL and ends when the token expires (``not_after``), or
   within a second of ``service revoke`` (broker/server.py). A service disabled at the provider
   is refused at its next connect; its live sessions end when their tokens expire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker import mqtt
from broker.auth import Authenticated, ConnectionFacts
from broker.errors import ConfigError, Refused
from provisioning.errors import InvalidIdentityError
from provisioning.identity import Identity, IdentityKind

__all__ = ["ALGORITHMS", "JWKSSource", "OIDCAuthenticator", "OIDCSettings"]

# The algorithms identity providers sign access tokens with; nothing symmetric, never "none".
ALGORITHMS = ("RS256", "ES256")
_BAD_CREDENTIALS = mqtt.CONNACK_BAD_CREDENTIALS


@dataclass(frozen=True, slots=True)
class OIDCSettings:
    """``broker run --oidc-issuer --oidc-audience --oidc-jwks [--oidc-claim] [--oidc-cafile]``."""

    issuer: str
    audience: str
    jwks: str  # a file path, or an https:// URL
    claim: str = "sub"
    cafile: Path | None = None  # the root that signs the JWKS server's certificate (None: system)
    timeout: float = 5.0
    cache_seconds: float = 300.0
    refresh_cooldown: float = 30.0
    leeway: int = 60

    def __post_init__(self) -> None:
        for name in ("issuer", "audience", "jwks", "claim"):
            if not getattr(self, name):
                msg = f"oidc needs --oidc-{name} (the identity provider's {name})"
                raise ConfigError(msg)
        if self.jwks.startswith("http://"):
            msg = f"--oidc-jwks {self.jwks}: the JWKS must come over https (or from a file)"
            raise ConfigError(msg)
        if self.timeout <= 0:
            msg = "the JWKS fetch timeout must be positive"
            raise ConfigError(msg)


class JWKSUnavailableError(Exception):
    """The JWKS could not be fetched or read: the connection is refused (fail closed)."""


class JWKSSource:
    """Signing keys by ``kid``: from a file (re-read when it changes or a ``kid`` is unknown) or
    from an https URL through PyJWT's ``PyJWKClient`` (cached, refreshed on an unknown ``kid``)."""

    def __init__(self, settings: OIDCSettings) -> None:
        self._settings = settings
        self._client: jwt.PyJWKClient | None = None
        self._file: Path | None = None
        self._file_stamp: tuple[int, int] | None = None
        self._file_keys: jwt.PyJWKSet | None = None
        if settings.jwks.startswith("https://"):
            context = ssl.create_default_context(
                cafile=str(settings.cafile) if settings.cafile else None
            )
            self._client = jwt.PyJWKClient(
                settings.jwks,
                lifespan=settings.cache_seconds,
                timeout=settings.timeout,
                ssl_context=context,
                cooldown_duration=settings.refresh_cooldown,
            )
        else:
            self._file = Path(settings.jwks)
            self._read_file()  # a missing or broken file is a start-up error

    def _read_file(self) -> jwt.PyJWKSet:
        assert self._file is not None  # noqa: S101 - file sources only
        try:
            st = os.stat(self._file)
            stamp = (st.st_mtime_ns, st.st_size)
            if self._file_keys is None or stamp != self._file_stamp:
                self._file_keys = jwt.PyJWKSet.from_dict(json.loads(self._file.read_text()))
                self._file_stamp = stamp
        except OSError as exc:
            msg = f"cannot read the JWKS {self._file}: {exc.strerror or exc}"
            raise ConfigError(msg) from None
        except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            msg = f"{self._file} is not a usable JWKS: {exc}"
            raise ConfigError(msg) from None
        return self._file_keys

    def key(self, kid: str) -> jwt.PyJWK | None:
        """The key with this ``kid``; None if the (refreshed) JWKS has none. Blocking."""
        if self._client is not None:
            try:
                return self._client.get_signing_key(kid)
            except jwt.PyJWKClientConnectionError as exc:
                raise JWKSUnavailableError(str(exc)) from None
            except jwt.PyJWKClientError as exc:
                if "Unable to find a signing key" in str(exc):
                    return None
                raise JWKSUnavailableError(str(exc)) from None
        try:
            keys = self._read_file()
        except ConfigError as exc:
            raise JWKSUnavailableError(str(exc)) from None
        for key in keys.keys:
            if key.key_id == kid:
                return key
        return None


class OIDCAuthenticator:
    """Access tokens of one identity provider, for services registered here."""

    def __init__(
        self,
        settings: OIDCSettings,
        *,
        trust_domain: str,
        service_active: Callable[[str], Awaitable[bool]],
        keys: JWKSSource | None = None,
    ) -> None:
        self._settings = settings
        self._trust_domain = trust_domain
        self._service_active = service_active
        self._keys = keys or JWKSSource(settings)

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        token = facts.password or ""

        def refuse(reason: str, detail: str, who: str | None = None) -> Refused:
            return Refused(reason, detail, connack=_BAD_CREDENTIALS, identity=who)

        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise refuse("oidc-malformed", "the password is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise refuse("oidc-algorithm", f"alg {alg!r} is not one of {', '.join(ALGORITHMS)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise refuse("oidc-no-kid", "the token header names no key (kid)")
        try:
            key = await asyncio.to_thread(self._keys.key, kid)
        except JWKSUnavailableError as exc:
            raise Refused(
                "oidc-jwks-unreachable",
                f"the identity provider's keys cannot be fetched, refusing (fail closed): {exc}",
                connack=mqtt.CONNACK_NOT_AUTHORIZED,
            ) from None
        if key is None:
            raise refuse("oidc-unknown-key", f"kid {kid!r} is not in the identity provider's JWKS")
        wanted = rsa.RSAPublicKey if alg == "RS256" else ec.EllipticCurvePublicKey
        if not isinstance(key.key, wanted) or (
            isinstance(key.key, ec.EllipticCurvePublicKey)
            and not isinstance(key.key.curve, ec.SECP256R1)
        ):
            raise refuse("oidc-algorithm", f"key {kid!r} is not a key for {alg}")
        claims = self._verify(token, key.key, alg, refuse)
        name = claims.get(self._settings.claim)
        if not isinstance(name, str):
            raise refuse("oidc-claims", f"the token has no string claim {self._settings.claim!r}")
        try:
            identity = Identity(IdentityKind.SERVICE, name, self._trust_domain)
        except InvalidIdentityError as exc:
            raise refuse("oidc-not-a-service", str(exc)) from None
        who = str(identity)
        if not await self._service_active(name):
            raise Refused(
                "oidc-unknown-service",
                f"service {name} is not registered here, or is revoked",
                connack=mqtt.CONNACK_NOT_AUTHORIZED,
                identity=who,
            )
        exp = claims["exp"]
        return Authenticated(
            identity=identity,
            method="oidc",
            credential=f"{self._settings.issuer}#{claims.get('jti') or kid}",
            not_after=dt.datetime.fromtimestamp(int(exp), dt.UTC),
        )

    def _verify(
        self,
        token: str,
        key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        alg: str,
        refuse: Callable[..., Refused],
    ) -> dict[str, Any]:
        s = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway,
                options={"require": ["exp", "iss", "aud", s.claim]},
            )
        except jwt.ExpiredSignatureError:
            raise refuse("oidc-expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise refuse("oidc-not-yet-valid", "the token is not valid yet (nbf/iat)") from None
        except jwt.InvalidAudienceError:
            raise refuse("oidc-audience", f"aud is not {s.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise refuse("oidc-issuer", f"iss is not {s.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise refuse("oidc-claims", f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise refuse("oidc-signature", "the signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise refuse("oidc-invalid", str(exc)) from None
        return claims
