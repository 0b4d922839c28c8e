"""Who a device (or a backend service) is: the one module that defines identity.

A name is 1-64 characters of ``[a-z0-9-]``, starting with a letter or digit, so that it is safe as
an MQTT topic level, a file name, a DNS label and a SPIFFE path segment at once. Everything that
accepts a name from outside (CLI, CSR, serial, MQTT) goes through :func:`validate_name`, which
explains in one line what is wrong.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from provisioning.errors import InvalidIdentityError

__all__ = [
    "MAX_NAME_LENGTH",
    "DeviceId",
    "Identity",
    "IdentityKind",
    "TrustDomain",
    "parse_spiffe_id",
    "validate_name",
    "validate_trust_domain",
]

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (SPIFFE-ID spec section 2.1).
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]{1,255}")
_RULE = "use 1-64 characters of a-z, 0-9 and '-', starting with a letter or digit"


def _name_problem(value: str) -> str | None:  # noqa: PLR0911 - one return per distinct reason
    """Why ``value`` is not a valid name, or None. Ordered so the first reason is the useful one."""
    if not value:
        return "it is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is {len(value)} characters long; the limit is {MAX_NAME_LENGTH}"
    for ch in value:
        if ch == "\x00":
            return "it contains a NUL byte"
        if not ch.isascii():
            return f"it contains the non-ASCII character {ch!a}"
        if ch in "/+#":
            return f"it contains {ch!r}, which is a topic separator or wildcard"
        if ch.isspace():
            return "it contains whitespace"
        if ch.isupper():
            return "it contains upper-case letters (names are lower case)"
    if value.startswith("-"):
        return "it starts with '-'"
    if not _NAME_RE.fullmatch(value):
        bad = sorted({ch for ch in value if not (ch.isdigit() or ch.islower() or ch == "-")})
        return f"it contains {''.join(bad)!r}"
    return None


def validate_name(value: object, *, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device id or service name; else InvalidIdentityError."""
    if not isinstance(value, str):
        raise InvalidIdentityError(repr(value), "it is not a string", what=what)
    problem = _name_problem(value)
    if problem is not None:
        raise InvalidIdentityError(_printable(value), f"{problem}; {_RULE}", what=what)
    return value


def validate_trust_domain(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidIdentityError(repr(value), "it is not a string", what="trust domain")
    if not _TRUST_DOMAIN_RE.fullmatch(value) or value.startswith((".", "-")) or ".." in value:
        raise InvalidIdentityError(
            _printable(value),
            "use lower-case letters, digits, '.', '-' and '_' (for example fleet.example)",
            what="trust domain",
        )
    return value


def _printable(value: str) -> str:
    # Keep error messages on one line and free of control characters, whatever the input was.
    shown = value if len(value) <= 80 else value[:77] + "..."
    return shown.encode("unicode_escape").decode("ascii")


class IdentityKind(enum.Enum):
    """Devices and backend services live in separate SPIFFE paths and get different topic grants."""

    DEVICE = "device"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A validated device id; ``str(DeviceId("dev-1")) == "dev-1"``."""

    value: str

    def __post_init__(self) -> None:
        validate_name(self.value)

    def __str__(self) -> str:
        return self.value

    @property
    def topic_prefix(self) -> str:
        """The subtree the device owns: ``devices/<id>/`` (with trailing slash)."""
        return f"devices/{self.value}/"


@dataclass(frozen=True, slots=True)
class TrustDomain:
    value: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.value)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Identity:
    """A device or service in a trust domain: what a certificate proves, what ACLs are over."""

    kind: IdentityKind
    name: str
    trust_domain: str

    def __post_init__(self) -> None:
        validate_name(self.name, what=f"{self.kind.value} {'id' if self.is_device else 'name'}")
        validate_trust_domain(self.trust_domain)

    @classmethod
    def device(cls, device_id: str, trust_domain: str) -> Identity:
        return cls(IdentityKind.DEVICE, device_id, trust_domain)

    @classmethod
    def service(cls, name: str, trust_domain: str) -> Identity:
        return cls(IdentityKind.SERVICE, name, trust_domain)

    @property
    def is_device(self) -> bool:
        return self.kind is IdentityKind.DEVICE

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind.value}/{self.name}"

    @property
    def topic_prefix(self) -> str:
        """``devices/<id>/`` for a device. Services own no subtree: policy grants their rights."""
        if not self.is_device:
            msg = f"service {self.name!r} owns no topic subtree"
            raise ValueError(msg)
        return f"devices/{self.name}/"

    def __str__(self) -> str:
        return self.spiffe_id


def parse_spiffe_id(uri: str) -> Identity:
    """Parse ``spiffe://<domain>/<device|service>/<name>``; else raise InvalidIdentityError."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise InvalidIdentityError(_printable(uri), "not a spiffe:// URI", what="SPIFFE ID")
    parts = uri[len(prefix) :].split("/")
    if len(parts) != 3:
        raise InvalidIdentityError(
            _printable(uri), "expected spiffe://<domain>/<device|service>/<name>", what="SPIFFE ID"
        )
    domain, kind, name = parts
    try:
        ident_kind = IdentityKind(kind)
    except ValueError:
        raise InvalidIdentityError(
            _printable(uri), f"unknown identity kind {kind!r}", what="SPIFFE ID"
        ) from None
    return Identity(ident_kind, name, domain)
