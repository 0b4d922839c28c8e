"""``pki.toml``: the trust domain and issuance defaults of a PKI directory."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from provisioning.errors import PKIError, ProvisioningError
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

    def to_toml(self) -> str:
        lines = [
            "# iotauth PKI settings. Keys live in private/; the root key may be moved offline.",
            "[pki]",
            "version = 1",
        ]
        for f in fields(self):
            value = getattr(self, f.name)
            if value == "" and f.name in ("registry", "station"):
                continue  # a single-station directory's pki.toml looks as it always did
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
