"""Run the broker: ``async with run_broker(settings) as broker: ... broker.port``.

This is the public entry point for the CLI, the demo, the fleet simulator and test fixtures.
It wires the pieces together: the revocation watcher (CRL + TLS context), the TLS listener, the
broker core (sessions, routing, policy), the audit log and optional metrics. :class:`BrokerThread`
runs the same thing on a background thread for synchronous callers (paho-based tests, scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from broker._listener import TLSListener
from broker.audit import AuditLog
from broker.auth import Authenticator, ListenerAuthenticator, MutualTLSAuthenticator
from broker.auth_jwt import DeviceTokenAuthenticator
from broker.auth_oidc import OIDCAuthenticator
from broker.auth_password import PasswordAuthenticator, SecretSource
from broker.auth_scram import ScramAuthenticator
from broker.core import BrokerCore
from broker.errors import BrokerError, ConfigError
from broker.metrics import Metrics, serve_metrics
from broker.renewal import RenewalService
from broker.revocation import CRLState, RevocationWatcher, open_revocation_watcher
from broker.settings import BrokerSettings
from broker.store import Committer, LoadReport, Opened, open_store

__all__ = ["BrokerThread", "RunningBroker", "run_broker"]

log = logging.getLogger("iotauth.broker")
T = TypeVar("T")


class RunningBroker:
    """A started broker. Only use it from the event loop that runs it."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        core: BrokerCore,
        listeners: list[TLSListener],
        watcher: RevocationWatcher,
        audit: AuditLog,
        metrics: Metrics,
        metrics_server: asyncio.Server | None,
        state: LoadReport | None = None,
    ) -> None:
        self.settings = settings
        self._core = core
        self._listeners = listeners
        self.watcher = watcher
        self.audit = audit
        self.metrics = metrics
        self._metrics_server = metrics_server
        # The renewal service, when settings.renewal asked for one.
        self.renewal: RenewalService | None = None
        # What the state directory gave back at start (None: --no-persist).
        self.state = state

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        """The first listener's port (the only one unless ``settings.listeners`` names more)."""
        return self._listeners[0].port

    @property
    def ports(self) -> dict[str, int]:
        """Each listener's bound port, keyed by its spec as given (``"0:jwt"`` -> 41234)."""
        return {
            str(spec): listener.port
            for spec, listener in zip(self.settings.listener_specs, self._listeners, strict=True)
        }

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None:
            return None
        return int(self._metrics_server.sockets[0].getsockname()[1])

    @property
    def crl(self) -> CRLState:
        return self.watcher.state

    def connected(self) -> list[str]:
        """client_ids with a live connection."""
        return sorted(self._core.live)

    async def kick(self, client_id: str, *, reason: str = "operator") -> bool:
        return self._core.kick(client_id, reason)

    async def check_revocations(self) -> bool:
        """Re-read crl.pem now instead of waiting for the next poll."""
        return await self.watcher.check()


@contextlib.asynccontextmanager
async def run_broker(
    settings: BrokerSettings,
    *,
    authenticator: Authenticator | None = None,
    audit_sink: Callable[[str], None] | None = None,
) -> AsyncIterator[RunningBroker]:
    """Start everything; stop everything on exit. Raises ConfigError for an unusable setup."""
    audit = _ObservedAudit(audit_sink)
    metrics = Metrics()
    # crl.pem of the PKI directory, or every station's CRL through the shared registry.
    watcher = open_revocation_watcher(
        settings.pki_dir, password=settings.key_password, interval=settings.crl_poll_interval
    )
    core = BrokerCore(settings, audit=audit, metrics=metrics)
    opened = _open_state(settings, watcher, core)

    committer = _start_committer(opened, core, metrics, watcher)
    watcher.on_change = _on_crl(core, metrics, committer)
    metrics.set("iotauth_broker_crl_number", watcher.state.number)
    metrics.gauge("iotauth_broker_crl_next_update_seconds", watcher.seconds_left)
    for name, read in watcher.gauges().items():
        metrics.gauge(name, read)
    # Service secrets (the password method): read from the registry, polled for rotations.
    secrets = _secret_source(settings)
    listeners = _listeners(settings, watcher, core, audit, metrics, authenticator, secrets)
    tasks: list[asyncio.Task[None]] = []
    metrics_server: asyncio.Server | None = None
    renewal: RenewalService | None = None
    try:
        for spec, listener in zip(settings.listener_specs, listeners, strict=True):
            try:
                await listener.start()
            except OSError as exc:
                msg = f"cannot listen on {settings.host}:{spec.port}: {exc.strerror or exc}"
                raise ConfigError(msg) from None
        if settings.metrics_port is not None:
            try:
                metrics_server = await serve_metrics(
                    metrics, settings.metrics_host, settings.metrics_port
                )
            except OSError as exc:  # name the metrics address, not the MQTT one that did open
                where = f"{settings.metrics_host}:{settings.metrics_port}"
                msg = f"cannot serve metrics on {where} (--metrics-port): {exc.strerror or exc}"
                raise ConfigError(msg) from None
        tasks = _background(settings, watcher, core, secrets)
        if settings.renewal is not None:
            renewal = _start_renewal(settings, _mtls_port(settings, listeners), audit)
            await asyncio.to_thread(renewal.start)
        running = RunningBroker(
            settings,
            core=core,
            listeners=listeners,
            watcher=watcher,
            audit=audit,
            metrics=metrics,
            metrics_server=metrics_server,
            state=opened.report if opened is not None else None,
        )
        running.renewal = renewal
        yield running
    finally:
        if renewal is not None:
            await asyncio.to_thread(renewal.stop)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if metrics_server is not None:
            metrics_server.close()
        for listener in listeners:
            await listener.close()
        watcher.close()
        await _close_state(opened, committer)


def _open_state(
    settings: BrokerSettings, watcher: RevocationWatcher, core: BrokerCore
) -> Opened | None:
    """Load the state directory into ``core`` (one line on stderr says what came back)."""
    if settings.data_dir is None:
        return None
    opened = open_store(
        settings.data_dir, pki_dir=settings.pki_dir, trust_domain=watcher.trust_domain, core=core
    )
    if opened.report.damage is not None:
        log.warning("%s", opened.report.damage)
    log.debug("%s", opened.report.line())
    return opened


def _on_crl(
    core: BrokerCore, metrics: Metrics, committer: Committer | None
) -> Callable[[CRLState], Coroutine[Any, Any, None]]:
    """What a new CRL does: close and forget the sessions of revoked certificates."""

    async def on_crl(state: CRLState) -> None:
        metrics.set("iotauth_broker_crl_number", state.number)
        stored = len(core.sessions)
        kicked = core.kick_revoked(state.revoked)
        if committer is not None and len(core.sessions) < stored:
            committer.compact_soon()  # a revoked session's queue leaves the disk too
        if kicked:
            log.info("closed %d session(s) of revoked certificates", kicked)

    return on_crl


async def _close_state(opened: Opened | None, committer: Committer | None) -> None:
    """What waits is written, then the directory is unlocked."""
    if committer is not None:
        await committer.close()
    if opened is not None:
        opened.close()


def _start_committer(
    opened: Opened | None, core: BrokerCore, metrics: Metrics, watcher: RevocationWatcher
) -> Committer | None:
    if opened is None:
        return None
    committer = Committer(core, opened)
    core.store = opened.store
    metrics.gauge("iotauth_broker_store_commits_total", lambda: committer.commits)
    metrics.gauge("iotauth_broker_store_failures_total", lambda: committer.failures)
    # A revoked identity's stored session and queue go now, before anyone connects, and
    # from the disk: the state is written again without them.
    stored = len(core.sessions)
    core.kick_revoked(watcher.state.revoked)
    if len(core.sessions) < stored:
        body, seq = opened.store.snapshot(core)
        opened.log.replace(body)
        opened.store.durable = seq
    # Then the delayed wills that fell due while the broker was down go out, and the sessions
    # that expired meanwhile (kept only for their wills) end: before anyone can connect.
    now = asyncio.get_running_loop().time()
    core.tick(now)
    core.expire_sessions(now)
    return committer


def _secret_source(settings: BrokerSettings) -> SecretSource | None:
    if any(spec.methods & {"password", "oidc", "scram"} for spec in settings.listener_specs):
        return SecretSource(settings.pki_dir)
    return None


def _background(
    settings: BrokerSettings,
    watcher: RevocationWatcher,
    core: BrokerCore,
    secrets: SecretSource | None,
) -> list[asyncio.Task[None]]:
    """The broker's own loops: CRL, expiry and, with a password listener, service secrets."""
    tasks = [
        asyncio.create_task(watcher.run(), name="broker-crl-watcher"),
        asyncio.create_task(_expiry_loop(core), name="broker-cert-expiry"),
    ]
    if secrets is not None:
        loop = _secret_loop(core, secrets, settings.crl_poll_interval, lambda: watcher.state.number)
        tasks.append(asyncio.create_task(loop, name="broker-secret-watcher"))
    return tasks


def _listeners(
    settings: BrokerSettings,
    watcher: RevocationWatcher,
    core: BrokerCore,
    audit: AuditLog,
    metrics: Metrics,
    authenticator: Authenticator | None,
    secrets: SecretSource | None = None,
) -> list[TLSListener]:
    """One TLSListener per spec, each with its TLS context mode and its methods' authenticators.

    An ``authenticator`` passed in (tests, embedders) serves every listener as it is.
    """
    by_method: dict[str, Authenticator] = {
        "mtls": MutualTLSAuthenticator(
            trust_domain=watcher.trust_domain, is_revoked=watcher.is_revoked
        ),
    }
    specs = settings.listener_specs
    if any("jwt" in spec.methods for spec in specs):
        by_method["jwt"] = DeviceTokenAuthenticator(
            trust_domain=watcher.trust_domain,
            issuers=lambda: watcher.issuers,
            is_revoked=watcher.is_revoked,
            audience=settings.token_audience,
            max_ttl=settings.token_max_ttl,
            leeway=settings.token_leeway,
        )
    if secrets is not None:
        password = PasswordAuthenticator(trust_domain=watcher.trust_domain, secret=secrets.secret)
        by_method["password"] = password
        # One backoff for both ways a secret is checked: a guess costs the same by either.
        by_method["scram"] = ScramAuthenticator(
            trust_domain=watcher.trust_domain, secret=secrets.secret, backoff=password.backoff
        )
    if secrets is not None and any("oidc" in spec.methods for spec in specs):
        if settings.oidc is None:
            msg = (
                "a listener lists oidc: give the identity provider "
                "(--oidc-issuer, --oidc-audience, --oidc-jwks)"
            )
            raise ConfigError(msg)
        by_method["oidc"] = OIDCAuthenticator(
            settings.oidc, trust_domain=watcher.trust_domain, service_active=secrets.service_active
        )
    listeners = []
    for spec in specs:
        auth = authenticator or ListenerAuthenticator(
            spec.methods, by_method, settings.methods_by_kind, metrics
        )
        mode = spec.client_certificates
        listeners.append(
            TLSListener(
                host=settings.host,
                port=spec.port,
                context=lambda mode=mode: watcher.context_for(mode),  # type: ignore[misc]
                core=core,
                authenticator=auth,
                limits=settings.limits,
                audit=audit,
                metrics=metrics,
            )
        )
    return listeners


def _mtls_port(settings: BrokerSettings, listeners: list[TLSListener]) -> int:
    """Where the in-process renewal service connects: it proves itself with its certificate."""
    for spec, listener in zip(settings.listener_specs, listeners, strict=True):
        if "mtls" in spec.methods:
            return listener.port
    msg = "the renewal service needs a listener that accepts mtls"
    raise ConfigError(msg)


class _ObservedAudit(AuditLog):
    """The audit log with in-process observers (the renewal service watches ``connect``)."""

    def __init__(self, sink: Callable[[str], None] | None) -> None:
        super().__init__(sink)
        self.observers: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, event: str, **fields: object) -> dict[str, Any]:
        record = super().emit(event, **fields)
        for observer in self.observers:
            observer(record)
        return record


def _start_renewal(settings: BrokerSettings, port: int, audit: _ObservedAudit) -> RenewalService:
    assert settings.renewal is not None  # noqa: S101 - checked by the caller
    service = RenewalService(
        settings.pki_dir,
        host=settings.host,
        port=port,
        settings=settings.renewal,
        passphrase=settings.key_password,
        audit=audit.emit,
    )

    def on_audit(record: dict[str, Any]) -> None:
        # A device that connects with an offered certificate confirms its renewal.
        if record["event"] == "connect" and "credential" in record and "identity" in record:
            service.observe_connect(str(record["identity"]), str(record["credential"]))

    audit.observers.append(on_audit)
    return service


async def _secret_loop(
    core: BrokerCore, secrets: SecretSource, interval: float, crl_number: Callable[[], int]
) -> None:
    """Sessions that came in with a service secret end within a second of its rotation or
    revocation: their credential names the verifier version (``name#version``), compared with
    the registry's while any such session is live. Sessions of identity-provider tokens end
    within a second of ``service revoke`` too (the service is no longer registered and active).
    A registry that cannot be read keeps the
    sessions (as a lost CRL source does) and is asked again on the next round. The loop owns
    ``secrets`` and closes it when cancelled (the broker's stop)."""
    try:
        await _watch_secrets(core, secrets, interval, crl_number)
    finally:
        await asyncio.to_thread(secrets.close)


async def _watch_secrets(
    core: BrokerCore, secrets: SecretSource, interval: float, crl_number: Callable[[], int]
) -> None:
    seen: tuple[dict[str, tuple[int, str]], dict[str, str], int] | None = None
    while True:
        await asyncio.sleep(interval)
        live = list(core.live.values())
        # scram sessions name the same verifier version as password sessions
        password = [s for s in live if s.authenticated.method in ("password", "scram")]
        oidc = [s for s in live if s.authenticated.method == "oidc"]
        if not (password or oidc):
            continue
        try:
            states = await secrets.states()
            for session in password:
                name, _, version = session.authenticated.credential.rpartition("#")
                if states.get(name) != (int(version), "active"):
                    core.kick(session.client_id, "secret-revoked", forget_session=True)
            # An identity-provider session names no credential of ours: when a secret, a
            # registration or the CRL changed (``service revoke`` changes one of them), ask
            # whether its service is still registered and not revoked.
            now = (states, await secrets.registrations() if oidc else {}, crl_number())
            if oidc and now != seen:
                for name in {s.authenticated.identity.name for s in oidc}:
                    if not await secrets.service_active(name):
                        for session in oidc:
                            if session.authenticated.identity.name == name:
                                core.kick(session.client_id, "revoked", forget_session=True)
            seen = now
        except Exception as exc:  # noqa: BLE001 - one bad round must never stop the watcher
            log.warning("cannot read service secrets: %s", exc)


async def _expiry_loop(core: BrokerCore) -> None:
    """A certificate that expires while its session is connected ends that session; a
    disconnected persistent session is forgotten after ``session_expiry``."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(5)
        core.kick_expired(dt.datetime.now(dt.UTC).timestamp())
        core.expire_sessions(loop.time())


class BrokerThread:
    """``run_broker`` on a daemon thread with its own event loop, for synchronous code.

    ::

        with BrokerThread(BrokerSettings(pki_dir)) as b:
            connect_paho("127.0.0.1", b.port)
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        authenticator: Authenticator | None = None,
        audit_sink: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._authenticator = authenticator
        self._audit_sink = audit_sink
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: RunningBroker | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="iotauth-broker", daemon=True)

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with run_broker(
                self.settings, authenticator=self._authenticator, audit_sink=self._audit_sink
            ) as running:
                self._running = running
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(body())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the starting thread
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> BrokerThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise self._error
        if self._running is None:
            msg = "broker did not start within 30 s"
            raise BrokerError(msg)
        return self

    @property
    def broker(self) -> RunningBroker:
        if self._running is None:
            msg = "broker not running"
            raise BrokerError(msg)
        return self._running

    @property
    def port(self) -> int:
        return self.broker.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the broker's loop and wait for its result."""
        assert self._loop is not None  # noqa: S101 - set before start() returns
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
