"""provisioning: device identity, the fleet CA, the registry, the ledger and the bench station.

May import ``hardware`` and nothing else of ours (docs/ARCHITECTURE.md, the one dependency rule).
"""

from provisioning.errors import (
    CSRRejectedError,
    DeviceExistsError,
    InvalidIdentityError,
    LedgerCorruptError,
    LedgerError,
    PassphraseError,
    PKIError,
    PKIExistsError,
    PKINotFoundError,
    ProvisioningError,
    RegistryError,
    UnknownDeviceError,
)
from provisioning.identity import (
    DeviceId,
    Identity,
    IdentityKind,
    TrustDomain,
    parse_spiffe_id,
    validate_name,
)

__all__ = [
    "CSRRejectedError",
    "DeviceExistsError",
    "DeviceId",
    "Identity",
    "IdentityKind",
    "InvalidIdentityError",
    "LedgerCorruptError",
    "LedgerError",
    "PKIError",
    "PKIExistsError",
    "PKINotFoundError",
    "PassphraseError",
    "ProvisioningError",
    "RegistryError",
    "TrustDomain",
    "UnknownDeviceError",
    "parse_spiffe_id",
    "validate_name",
]
