"""The ``jwt`` method: a device proves itself with a token signed by its own key.

The token's contract (claims, header, lifetimes) is :mod:`provisioning.tokens`. What this checks,
in order, each failure a :class:`~broker.errors.Refused` with its own audit reason:

1. the password is a compact JWS whose header carries ``x5c`` = [the device certificate];
2. that certificate was issued by an issuing CA the broker trusts (its own, or on a shared
   registry any active station's), names a device of this trust domain
   (the same identity rules as a TLS client certificate), is valid now and is not on the CRL, so a
   revoked or superseded device is refused and its live token sessions are kicked by the CRL
   watcher exactly like its TLS sessions (``credential`` is the certificate serial);
3. the header's ``alg`` is the one algorithm the certificate's key type signs with (ES256 for P-256,
   EdDSA for Ed25519): ``none``, HS256 keyed with the public key and any other algorithm are refused
   before a signature is looked at;
4. PyJWT verifies the signature with the certificate's public key, ``aud``, ``exp`` and ``iat``
   with a bounded clock skew; ``sub`` must be the certificate's device;
5. the lifetime ``exp - iat`` is at most the broker's cap, and ``jti`` has not been seen before
   within the token's lifetime (a replay cache bounded by the tokens' own expiry).

The session ends when the token expires (``not_after``): a device reconnects with a fresh token.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker import mqtt
from broker.auth import Authenticated, ConnectionFacts, certificate_identity, check_certificate_now
from broker.errors import Refused
from provisioning.identity import Identity, IdentityKind
from provisioning.tokens import DEFAULT_TTL, MAX_TTL, TokenError, algorithm_for

__all__ = ["DeviceTokenAuthenticator", "ReplayCache"]

# MQTT 3.1.1 CONNACK 4: "bad user name or password" is what a client library shows for a
# credential that does not verify.
_BAD_CREDENTIALS = mqtt.CONNACK_BAD_CREDENTIALS


@dataclass(frozen=True, slots=True)
class _Claims:
    sub: str
    iat: int
    exp: int
    jti: str


class ReplayCache:
    """``jti`` values seen, each kept until its token expires; bounded by ``capacity``.

    When full, the broker refuses new tokens rather than forgetting unexpired ``jti`` values
    (forgetting would re-open replays): a flood of fresh tokens cannot buy a replay.
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self._capacity = capacity
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, subject: str, jti: str, expires: float, now: float) -> bool:
        """Record a token; False when it was seen already (a replay) or the cache is full."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key = heapq.heappop(self._expiry)
            if self._seen.get(key, now + 1) <= now:
                del self._seen[key]
        key = (subject, jti)
        if key in self._seen or len(self._seen) >= self._capacity:
            return False
        self._seen[key] = expires
        heapq.heappush(self._expiry, (expires, key))
        return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class DeviceTokenAuthenticator:
    """Checks device tokens against the fleet CA, the CRL and the replay cache."""

    def __init__(
        self,
        *,
        trust_domain: str,
        issuers: Callable[[], Sequence[x509.Certificate]],
        is_revoked: Callable[[int], bool],
        audience: str | None = None,
        max_ttl: int = DEFAULT_TTL,
        leeway: int = 60,
        replay: ReplayCache | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not 0 < max_ttl <= MAX_TTL:
            msg = f"the token lifetime cap must be between 1 and {MAX_TTL} seconds"
            raise ValueError(msg)
        self._trust_domain = trust_domain
        self._audience = audience or trust_domain
        self._issuers = issuers
        self._is_revoked = is_revoked
        self._max_ttl = max_ttl
        self._leeway = leeway
        self._replay = replay or ReplayCache()
        self._clock = clock

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        token = facts.password or ""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Refused(
                "token-malformed", "the password is not a JWT", connack=_BAD_CREDENTIALS
            ) from None
        cert, identity = self._certificate(header)
        who = str(identity)
        if identity.kind is not IdentityKind.DEVICE:
            raise Refused("token-not-device", "only devices sign their own tokens", identity=who)
        now = self._clock()
        check_certificate_now(cert, identity, now, self._is_revoked)
        try:
            expected = algorithm_for(cert.public_key())
        except TokenError as exc:
            raise Refused("token-algorithm", str(exc), identity=who) from None
        if header.get("alg") != expected:
            raise Refused(
                "token-algorithm",
                f"alg {header.get('alg')!r} is not {expected}, the algorithm of this device's key",
                connack=_BAD_CREDENTIALS,
                identity=who,
            )
        claims = self._verify(token, cert, expected, now, who)
        if claims.sub != identity.name:
            raise Refused(
                "token-subject",
                f"sub {claims.sub!r} is not the certificate's device {identity.name}",
                connack=_BAD_CREDENTIALS,
                identity=who,
            )
        issued, expires = claims.iat, claims.exp
        if expires - issued > self._max_ttl:
            raise Refused(
                "token-lifetime",
                f"the token lives {expires - issued} s; the most accepted is {self._max_ttl} s",
                connack=_BAD_CREDENTIALS,
                identity=who,
            )
        if not self._replay.add(identity.name, claims.jti, expires, now.timestamp()):
            raise Refused(
                "token-replayed",
                "this token was used before (jti seen); sign a fresh one",
                connack=_BAD_CREDENTIALS,
                identity=who,
            )
        token_end = dt.datetime.fromtimestamp(expires, dt.UTC)
        return Authenticated(
            identity=identity,
            method="jwt",
            credential=format(cert.serial_number, "x"),
            not_after=min(token_end, cert.not_valid_after_utc),
        )

    def _certificate(self, header: dict[str, object]) -> tuple[x509.Certificate, Identity]:
        x5c = header.get("x5c")
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            raise Refused(
                "token-no-certificate",
                "the token header has no x5c certificate",
                connack=_BAD_CREDENTIALS,
            )
        return self._trusted(x5c[0], tuple(self._issuers()))

    # A device reconnects with the same certificate many times: its issuer signature and identity
    # are checked once per (certificate, issuing CA). Validity, revocation and the token itself
    # are checked on every connect. A refusal raises, so only trusted certificates are cached.
    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one authenticator per broker, bounded
    def _trusted(
        self, x5c: str, issuers: tuple[x509.Certificate, ...]
    ) -> tuple[x509.Certificate, Identity]:
        try:
            cert = x509.load_der_x509_certificate(base64.b64decode(x5c, validate=True))
        except (ValueError, binascii.Error):
            raise Refused(
                "token-bad-certificate",
                "the x5c certificate cannot be parsed",
                connack=_BAD_CREDENTIALS,
            ) from None
        if not any(_issued_by(cert, issuer) for issuer in issuers):
            raise Refused(
                "token-untrusted-certificate",
                "the x5c certificate was not issued by an issuing CA of this fleet",
                connack=_BAD_CREDENTIALS,
            )
        return cert, certificate_identity(cert, self._trust_domain)

    def _verify(
        self, token: str, cert: x509.Certificate, alg: str, now: dt.datetime, who: str
    ) -> _Claims:
        def refuse(reason: str, detail: str) -> Refused:
            return Refused(reason, detail, connack=_BAD_CREDENTIALS, identity=who)

        try:
            claims: dict[str, object] = jwt.decode(
                token,
                key=cert.public_key(),  # type: ignore[arg-type]
                algorithms=[alg],
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["sub", "aud", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise refuse("token-expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise refuse("token-not-yet-valid", "the token is not valid yet (iat/nbf)") from None
        except jwt.InvalidAudienceError:
            raise refuse("token-audience", f"aud is not {self._audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise refuse("token-claims", f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise refuse(
                "token-signature", "the signature was not made by this certificate's key"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise refuse("token-invalid", str(exc)) from None
        sub, iat, exp, jti = claims["sub"], claims["iat"], claims["exp"], claims["jti"]
        if not (isinstance(iat, int) and isinstance(exp, int)):
            raise refuse("token-claims", "iat and exp must be integers")
        if not (isinstance(sub, str) and isinstance(jti, str) and jti):
            raise refuse("token-claims", "sub and jti must be non-empty strings")
        # Whatever PyJWT's version does with iat: a token from the future is refused here.
        if iat > now.timestamp() + self._leeway:
            raise refuse("token-not-yet-valid", "the token was issued in the future (iat)")
        return _Claims(sub, iat, exp, jti)
