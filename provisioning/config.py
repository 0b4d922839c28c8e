"""``pki.toml``: the trust domain and issuance defaults of a PKI directory."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from provisioning.errors import PKIError, ProvisioningError
from provisioning.identity import validate_name, validate_trust_domain

__all__ = ["PASSPHRASE_ENV", "SETTINGS", "PKIConfig", "Setting"]

PASSPHRASE_ENV = "IOTAUTH_CA_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


@dataclass(frozen=True, slots=True)
class PKIConfig:
    trust_domain: str
    encrypted_keys: bool = False
    device_days: int = 90
    service_days: int = 90
    crl_hours: int = 168
    # The broker warns when the CRL is this close to its nextUpdate; `ca crl` should run before.
    crl_warn_hours: int = 48
    # Where a CA key lives when it is not a file in private/: a pkcs11: URI (docs/HSM.md).
    issuing_key: str | None = None
    root_key: str | None = None
    # A postgresql:// URL (no password: PGPASSWORD or ~/.pgpass) shared by several stations and
    # brokers; empty: registry.sqlite3 and ledger.jsonl in this directory.
    registry: str = ""
    # This directory's station name in the shared registry (made by `ca add-station`).
    station: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if self.registry:
            from provisioning.registry_pg import check_registry_url

            try:
                check_registry_url(self.registry)
            except ProvisioningError as exc:
                msg = f"pki.toml: {exc}"
                raise PKIError(msg) from None
        for name in ("device_days", "service_days", "crl_hours", "crl_warn_hours"):
            if getattr(self, name) <= 0:
                msg = f"pki.toml: {name} must be positive"
                raise PKIError(msg)
        for name in ("issuing_key", "root_key"):
            value = getattr(self, name)
            if value is not None:
                from provisioning.hsm import Pkcs11URI

                if not isinstance(value, str):
                    msg = f"pki.toml: {name} must be a pkcs11: URI string"
                    raise PKIError(msg)
                try:
                    Pkcs11URI.parse(value)
                except PKIError as exc:
                    msg = f"pki.toml: {name}: {exc}"
                    raise PKIError(msg) from None

    def to_toml(self) -> str:
        lines = [
            "# iotauth PKI settings. Keys live in private/; the root key may be moved offline.",
            "[pki]",
            "version = 1",
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == "":
                # A key kept in private/, or no shared registry: the pki.toml of a single-station
                # directory looks as it always did.
                continue
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, int):
                rendered = str(value)
            else:
                rendered = json.dumps(value)  # a TOML basic string: quotes and \\ escaped
            lines.append(f"{f.name} = {rendered}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> PKIConfig:
        """Read and check ``path``; every failure names the file, the key and what it expects."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            msg = f"{path}: not valid TOML: {exc}"
            raise PKIError(msg) from None
        except UnicodeDecodeError:
            msg = f"{path}: not valid TOML: the file is not UTF-8 text"
            raise PKIError(msg) from None
        section = data.get("pki")
        if not isinstance(section, dict):
            msg = f"{path}: missing [pki] section (see 'iotauth ca init')"
            raise PKIError(msg)
        if section.get("version") != 1:
            msg = f"{path}: key 'version' in [pki] must be 1, not {section.get('version')!r}"
            raise PKIError(msg)
        unknown = sorted(set(section) - set(SETTINGS) - {"version"})
        if unknown:
            msg = (
                f"{path}: unknown key(s) {', '.join(map(repr, unknown))} in [pki]; "
                f"known: version, {', '.join(SETTINGS)}"
            )
            raise PKIError(msg)
        kwargs: dict[str, Any] = {}
        for key, setting in SETTINGS.items():
            if key not in section:
                if setting.required:
                    msg = f"{path}: key {key!r} in [pki] is missing; expected {setting.expected}"
                    raise PKIError(msg)
                continue
            value = section[key]
            # bool is a subclass of int in Python, but `device_days = true` is not a number.
            if type(value) is not setting.kind or not setting.accepts(value):
                msg = (
                    f"{path}: key {key!r} in [pki] must be {setting.expected}, not {_shown(value)}"
                )
                raise PKIError(msg)
            kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Setting:
    """One key of ``[pki]``: its TOML type, the words of the error, and the value check."""

    kind: type
    expected: str
    accepts: Callable[[Any], bool] = lambda _value: True
    required: bool = False


def _is_trust_domain(value: str) -> bool:
    try:
        validate_trust_domain(value)
    except ProvisioningError:
        return False
    return True


def _positive(value: int) -> bool:
    return value > 0


def _shown(value: object) -> str:
    if isinstance(value, bool):  # as the file spells it
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_DAYS = "a whole number of days above 0 (e.g. 90)"
_HOURS = "a whole number of hours above 0"
_PKCS11_URI = "a pkcs11: URI (e.g. 'pkcs11:token=ca;object=issuing')"


def _is_name(value: str) -> bool:
    try:
        validate_name(value, what="station name")
    except ProvisioningError:
        return False
    return True


# The keys of pki.toml's [pki] section besides `version`, one per field of PKIConfig (a test keeps
# the two in step). A new key is one line here and one field above.
SETTINGS: dict[str, Setting] = {
    "trust_domain": Setting(
        str,
        "a trust domain of lower-case letters, digits, '.', '-', '_' (e.g. fleet.example)",
        _is_trust_domain,
        required=True,
    ),
    "encrypted_keys": Setting(bool, "true or false"),
    "device_days": Setting(int, _DAYS, _positive),
    "service_days": Setting(int, _DAYS, _positive),
    "crl_hours": Setting(int, _HOURS, _positive),
    "crl_warn_hours": Setting(int, _HOURS, _positive),
    # A CA key in a PKCS#11 token; the URI itself is checked, with the fix, by PKIConfig.
    "issuing_key": Setting(str, _PKCS11_URI),
    "root_key": Setting(str, _PKCS11_URI),
    # The shared registry; the URL itself (no password in it) is checked, with the fix, by
    # PKIConfig.
    "registry": Setting(str, "a postgresql:// URL without a password (e.g. 'postgresql://db/f')"),
    "station": Setting(str, "a station name of a-z, 0-9 and '-' (e.g. 'line-2')", _is_name),
}
