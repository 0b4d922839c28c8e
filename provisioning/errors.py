"""The one exception root of ``provisioning`` and its specific failures.

Every error carries the fields a caller needs (device id, path, line) and a message that fits on one
line, so the CLI can print ``error: <message>`` and exit non-zero without a traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CSRRejectedError",
    "DeviceExistsError",
    "InvalidIdentityError",
    "LedgerCorruptError",
    "LedgerError",
    "PKIError",
    "PKIExistsError",
    "PKINotFoundError",
    "PassphraseError",
    "ProvisioningError",
    "RegistryError",
    "RegistryUnavailableError",
    "TokenError",
    "UnknownDeviceError",
]


class ProvisioningError(Exception):
    """Root of every error raised by ``provisioning``."""


class InvalidIdentityError(ProvisioningError, ValueError):
    """A device id, service name or trust domain that breaks the identity contract."""

    def __init__(self, value: str, reason: str, *, what: str = "device id") -> None:
        self.value = value
        self.reason = reason
        self.what = what
        super().__init__(f"invalid {what} '{value}': {reason}")


class PKIError(ProvisioningError):
    """The PKI directory is missing, damaged or cannot do what was asked."""


class PKIExistsError(PKIError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path} already holds a PKI; refusing to overwrite it")


class PKINotFoundError(PKIError):
    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"{path} is not a PKI directory (no pki.toml); run 'iotauth ca init' first"
        )


class PassphraseError(PKIError):
    """Encrypted CA keys without the passphrase, or with a wrong one."""


class TokenError(PKIError):
    """A CA key in a PKCS#11 token cannot be used: module, token, PIN or key object."""


class CSRRejectedError(ProvisioningError):
    """A certificate signing request that fails the station's policy."""

    def __init__(self, reason: str, *, device_id: str | None = None) -> None:
        self.reason = reason
        self.device_id = device_id
        prefix = f"CSR for {device_id} rejected" if device_id else "CSR rejected"
        super().__init__(f"{prefix}: {reason}")


class RegistryError(ProvisioningError):
    """The device registry refused an operation."""


class RegistryUnavailableError(RegistryError):
    """The shared registry cannot be reached (or refused the login).

    ``permanent`` is False for a connection that may come back (a database restart, a network
    blip): a station retries its transaction; True for a wrong password or a missing database.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        self.permanent = permanent
        super().__init__(message)


class DeviceExistsError(RegistryError):
    def __init__(self, name: str, *, kind: str = "device") -> None:
        self.name = name
        self.kind = kind
        super().__init__(
            f"{kind} {name!r} already has an active certificate; "
            "pass --rotate to replace it (the old one is revoked as superseded)"
        )


class UnknownDeviceError(RegistryError):
    def __init__(
        self, name: str, *, kind: str = "device", detail: str = "is not in the registry"
    ) -> None:
        self.name = name
        self.kind = kind
        super().__init__(f"{kind} {name!r} {detail}")


class LedgerError(ProvisioningError):
    """The manufacturing ledger cannot be read or appended."""


class LedgerCorruptError(LedgerError):
    """Verification found the first entry that breaks the chain."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"ledger line {line}: {reason}")
