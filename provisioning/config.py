"""``pki.toml``: the trust domain and issuance defaults of a PKI directory."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from provisioning.errors import PKIError
from provisioning.identity import validate_trust_domain

__all__ = ["PASSPHRASE_ENV", "PKIConfig"]

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

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
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
            if value is None:
                continue  # a key kept in private/; a pkcs11: URI is canonical: no quotes either
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, int):
                rendered = str(value)
            else:
                rendered = f'"{value}"'  # validated names contain no quotes or backslashes
            lines.append(f"{f.name} = {rendered}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: Path) -> PKIConfig:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            msg = f"{path}: {exc}"
            raise PKIError(msg) from None
        section = data.get("pki")
        if not isinstance(section, dict) or section.get("version") != 1:
            msg = f"{path}: missing [pki] section with version = 1"
            raise PKIError(msg)
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {k: v for k, v in section.items() if k in known}
        unknown = sorted(set(section) - set(known) - {"version"})
        if unknown:
            msg = f"{path}: unknown setting(s) {', '.join(unknown)}"
            raise PKIError(msg)
        try:
            return cls(**kwargs)
        except TypeError as exc:
            msg = f"{path}: {exc}"
            raise PKIError(msg) from None
