"""Revocation that reaches a running broker: watch ``crl.pem``, swap the TLS context, kick.

``iotauth device revoke`` runs in another process and atomically replaces ``pki/crl.pem`` (a
rename, so the inode changes) with a CRL whose number is higher. The watcher stats the file every
``interval`` seconds (default 0.2 s: a stat is cheap and needs no inotify), and when it changed:

1. parses the CRL and checks its signature against ``issuing.crt``; a CRL that is unsigned,
   older (lower number) or unreadable is ignored with a warning, so a stray file can never
   *un*-revoke a device;
2. builds a fresh server context through ``provisioning.tls`` so new handshakes check the new
   CRL, and the old context's TLS 1.2 session-ID cache (which could resume a revoked session)
   is dropped with it;
3. calls ``on_change`` so the broker closes the live sessions of every revoked certificate.

Stale CRL policy (fail closed): the context checks the leaf against the CRL, and OpenSSL refuses
every handshake once the CRL is past its nextUpdate. The watcher logs a warning from
``crl_warn_hours`` (pki.toml, default 48 h) before that moment, once an hour, and an error after
it; sessions already connected are kept. ``iotauth ca crl`` (a refresh) fixes it without restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from broker.errors import ConfigError
from provisioning.config import PKIConfig
from provisioning.errors import ProvisioningError
from provisioning.tls import ClientCertificates, server_context_for_pki

__all__ = ["CRLState", "RevocationWatcher", "read_crl"]

log = logging.getLogger("iotauth.broker.revocation")


@dataclass(frozen=True, slots=True)
class CRLState:
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    revoked: frozenset[int]

    def seconds_left(self, now: dt.datetime | None = None) -> float:
        return (self.next_update - (now or dt.datetime.now(dt.UTC))).total_seconds()


def read_crl(path: Path, issuer: x509.Certificate) -> CRLState:
    """Parse and verify a CRL; raise ConfigError if it is missing, unsigned or malformed."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        msg = f"cannot read CRL {path}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    except ValueError:  # cryptography's text is a paragraph with a URL; the file is the news
        msg = f"{path} is not a PEM CRL (cut short or edited?); run 'iotauth ca crl'"
        raise ConfigError(msg) from None
    public_key = issuer.public_key()
    if crl.issuer != issuer.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
        msg = f"{path} is not signed by the issuing CA"
        raise ConfigError(msg)
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        msg = f"{path} has no CRL number"
        raise ConfigError(msg) from None
    next_update = crl.next_update_utc
    if next_update is None:
        msg = f"{path} has no nextUpdate"
        raise ConfigError(msg)
    return CRLState(
        number=number,
        this_update=crl.last_update_utc,
        next_update=next_update,
        revoked=frozenset(r.serial_number for r in crl),
    )


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class RevocationWatcher:
    """Holds the current CRL and TLS context of a PKI directory and keeps them fresh."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        password: bytes | None = None,
        interval: float = 0.2,
        on_change: Callable[[CRLState], Awaitable[None]] | None = None,
    ) -> None:
        self.pki_dir = pki_dir
        self._password = password
        self.interval = interval
        self.on_change = on_change
        issuing = pki_dir / "issuing.crt"
        try:
            self._config = PKIConfig.load(pki_dir / "pki.toml")
            self._issuer = x509.load_pem_x509_certificate(issuing.read_bytes())
        except ValueError:
            msg = f"{issuing} is not a PEM certificate (cut short or edited?)"
            raise ConfigError(msg) from None
        except OSError as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc.strerror or exc}: {exc.filename}"
            raise ConfigError(msg) from None
        except ProvisioningError as exc:
            msg = f"{pki_dir} is not a usable PKI directory: {exc}"
            raise ConfigError(msg) from None
        self._stamp = _stamp(pki_dir / "crl.pem")
        self.state = read_crl(pki_dir / "crl.pem", self._issuer)
        # One server context per client-certificate mode in use (mutual TLS, and listeners that
        # also or only take tokens); all rebuilt together when the CRL changes.
        self._contexts: dict[ClientCertificates, ssl.SSLContext] = {
            "required": self._build_context("required")
        }
        self._last_stale_warning: float | None = None

    @property
    def trust_domain(self) -> str:
        return self._config.trust_domain

    def seconds_left(self) -> float:
        return self.state.seconds_left()

    @property
    def issuer(self) -> x509.Certificate:
        """The issuing CA that signs this fleet's certificates and CRL."""
        return self._issuer

    @property
    def context(self) -> ssl.SSLContext:
        """The mutual-TLS server context for the CRL in force."""
        return self._contexts["required"]

    def context_for(self, client_certificates: ClientCertificates) -> ssl.SSLContext:
        """The server context for a listener's client-certificate mode, for the CRL in force."""
        if client_certificates not in self._contexts:
            self._contexts[client_certificates] = self._build_context(client_certificates)
        return self._contexts[client_certificates]

    def is_revoked(self, serial: int) -> bool:
        return serial in self.state.revoked

    def _build_context(self, client_certificates: ClientCertificates) -> ssl.SSLContext:
        try:
            return server_context_for_pki(
                self.pki_dir,
                password=self._password,
                check_crl=client_certificates != "none",
                client_certificates=client_certificates,
            )
        except ProvisioningError as exc:
            raise ConfigError(str(exc)) from None

    async def check(self) -> bool:
        """Reload if crl.pem changed; True if a newer CRL is now in force."""
        stamp = _stamp(self.pki_dir / "crl.pem")
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            state = read_crl(self.pki_dir / "crl.pem", self._issuer)
        except ConfigError as exc:
            log.warning("ignoring crl.pem: %s; keeping CRL #%d", exc, self.state.number)
            return False
        if state.number <= self.state.number:
            if state.number < self.state.number:
                log.warning(
                    "ignoring crl.pem #%d: older than CRL #%d in force",
                    state.number,
                    self.state.number,
                )
            return False
        try:
            contexts = {mode: self._build_context(mode) for mode in self._contexts}
        except ConfigError as exc:
            log.warning("cannot rebuild the TLS context for CRL #%d: %s", state.number, exc)
            return False
        self.state, self._contexts = state, contexts
        log.info("CRL #%d in force: %d revoked certificate(s)", state.number, len(state.revoked))
        if self.on_change is not None:
            await self.on_change(state)
        return True

    def warn_if_stale(self, now: dt.datetime | None = None) -> str | None:
        """Log (at most hourly) when the CRL is near or past nextUpdate; return the message."""
        left = self.state.seconds_left(now)
        if left > self._config.crl_warn_hours * 3600:
            return None
        loop_time = asyncio.get_running_loop().time()
        if self._last_stale_warning is not None and loop_time - self._last_stale_warning < 3600:
            return None
        self._last_stale_warning = loop_time
        when = self.state.next_update.isoformat()
        if left <= 0:
            msg = (
                f"CRL #{self.state.number} expired at {when}: every new TLS handshake is refused "
                "until a fresh CRL is published ('iotauth ca crl --pki ...')"
            )
            log.error(msg)
        else:
            msg = (
                f"CRL #{self.state.number} goes stale at {when} ({left / 3600:.1f} h left); "
                "publish a fresh one ('iotauth ca crl --pki ...') or new handshakes will fail"
            )
            log.warning(msg)
        return msg

    async def run(self) -> None:
        """Poll until cancelled. Errors in one round are logged and the next round tries again."""
        self.warn_if_stale()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
                self.warn_if_stale()
            except Exception:  # one bad round must never stop revocation for good
                log.exception("CRL watcher round failed")
