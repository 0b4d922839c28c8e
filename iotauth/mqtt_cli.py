"""``iotauth mqtt pub|sub``: an MQTT client for people and scripts, in every method of the broker.

Like ``mosquitto_pub``/``mosquitto_sub``, but it knows the project's credentials: ``--creds DIR``
(mutual TLS, or ``--auth jwt [--audience AUD]`` to sign a device token with that directory's
key, for the trust domain or a broker's ``--token-audience``), ``--auth password
--user NAME --secret-env VAR``, ``--auth scram --user NAME --secret-env VAR -V 5`` and ``--auth oidc
--token-file F``. The broker is always verified
against ``--cafile`` (default: the credential directory's ``ca.crt``). A refusal is one line with
the broker's reason code; nothing here prints a traceback.

Built on paho-mqtt, the client library devices use, so what works here works in a device's code;
except ``scram``: paho has no AUTH packet, so that method runs on ``iotauth.scram_client``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from iotauth.scram_client import ClientError, ScramMQTTClient

if TYPE_CHECKING:
    from paho.mqtt.client import MQTTMessage, MQTTMessageInfo
    from paho.mqtt.reasoncodes import ReasonCode

    from broker.mqtt import Publish

__all__ = ["mqtt_app"]

mqtt_app = typer.Typer(
    name="mqtt",
    help="Publish and subscribe with any of the broker's authentication methods.",
    no_args_is_help=True,
)

_METHODS = ("mtls", "jwt", "password", "oidc", "scram")
_CONNECT_TIMEOUT = 15.0


@mqtt_app.callback()
def _mqtt() -> None:
    """Publish and subscribe with any of the broker's authentication methods."""


BrokerOpt = Annotated[
    str | None,
    typer.Option(
        "--broker",
        metavar="HOST:PORT",
        help="The broker (default: the credential directory's identity.json).",
    ),
]
CredsOpt = Annotated[
    Path | None, typer.Option("--creds", metavar="DIR", help="A credential directory.")
]
AuthOpt = Annotated[
    str | None,
    typer.Option(
        "--auth",
        metavar="METHOD",
        help="mtls (default with --creds), jwt, password, scram (with -V 5) or oidc.",
    ),
]
UserOpt = Annotated[
    str | None, typer.Option("--user", metavar="NAME", help="Service name (password, scram).")
]
SecretEnvOpt = Annotated[
    str | None,
    typer.Option("--secret-env", metavar="VAR", help="Environment variable that holds the secret."),
]
TokenFileOpt = Annotated[
    Path | None, typer.Option("--token-file", metavar="FILE", help="Access token (oidc).")
]
CafileOpt = Annotated[
    Path | None,
    typer.Option(
        "--cafile", metavar="FILE", help="Root that signs the broker (default: DIR/ca.crt)."
    ),
]
VersionOpt = Annotated[
    str, typer.Option("-V", "--protocol-version", metavar="5|311", help="MQTT version.")
]
TopicOpt = Annotated[str, typer.Option("-t", "--topic", metavar="TOPIC", help="Topic.")]
QosOpt = Annotated[int, typer.Option("-q", "--qos", min=0, max=2, help="QoS 0, 1 or 2.")]
ClientIdOpt = Annotated[
    str | None,
    typer.Option("-i", "--client-id", metavar="ID", help="Client id (default: the identity)."),
]
TtlOpt = Annotated[
    int, typer.Option("--ttl", min=1, max=86400, help="Device token lifetime, seconds (jwt).")
]
AudienceOpt = Annotated[
    str | None,
    typer.Option(
        "--audience",
        metavar="AUD",
        help="Device token aud claim (jwt; default: the trust domain), as the broker's "
        "--token-audience.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@dataclass(frozen=True, slots=True)
class Credentials:
    """How the client proves who it is: the authentication options of pub and sub, as given."""

    creds: Path | None = None  # a credential directory (mtls, jwt)
    auth: str | None = None  # the method; mtls when only creds is given
    user: str | None = None  # service name (password, scram)
    secret_env: str | None = None  # the variable that holds the secret (password, scram)
    token_file: Path | None = None  # the access token (oidc)
    ttl: int = 3600  # device token lifetime (jwt)
    audience: str | None = None  # device token aud (jwt); None: the trust domain


@dataclass(frozen=True, slots=True)
class Login:
    """Where to connect and how to prove who we are; built and checked before any socket."""

    host: str
    port: int
    client_id: str
    context: ssl.SSLContext
    method: str
    username: str | None = None
    password: str | None = None
    version: int = 4  # paho's MQTTv311; 5 is MQTTv5


def login(
    *,
    broker: str | None,
    credentials: Credentials,
    cafile: Path | None,
    version: str,
    client_id: str | None,
) -> Login:
    """Check every option and read every credential before a socket is opened."""
    creds, user = credentials.creds, credentials.user
    method = credentials.auth or ("mtls" if creds is not None else None)
    if method is None:
        msg = "say how to authenticate: --creds DIR, or --auth password|scram|oidc"
        raise ClientError(msg)
    if method not in _METHODS:
        msg = f"unknown --auth {method!r} (one of {', '.join(_METHODS)})"
        raise ClientError(msg)
    if method in ("mtls", "jwt") and creds is None:
        msg = f"--auth {method} needs --creds DIR"
        raise ClientError(msg)
    if version not in ("5", "311"):
        msg = f"-V {version!r}: use 5 or 311"
        raise ClientError(msg)
    if method == "scram" and version != "5":
        msg = "--auth scram needs -V 5: SCRAM runs in MQTT 5's AUTH exchange (3.1.1 has none)"
        raise ClientError(msg)
    if credentials.audience is not None and method != "jwt":
        msg = f"--audience is the device token's aud (--auth jwt), not for --auth {method}"
        raise ClientError(msg)
    identity = _identity(creds) if creds is not None else {}
    name = str(identity.get("device_id") or identity.get("service_name") or user or "")
    username, password = _secret(method, name, credentials)
    if method in ("password", "scram"):
        name = user or name
    host, port = _address(broker or str(identity.get("broker") or ""))
    trust = cafile or (creds / "ca.crt" if creds is not None else None)
    if trust is None:
        msg = "--cafile is needed to verify the broker (or --creds DIR with its ca.crt)"
        raise ClientError(msg)
    chosen_id = client_id or name
    if not chosen_id:
        msg = "no client id: give -i ID (the broker requires it to equal the identity)"
        raise ClientError(msg)
    return Login(
        host=host,
        port=port,
        client_id=chosen_id,
        context=_context(trust, creds if method == "mtls" else None),
        method=method,
        username=username,
        password=password,
        version=5 if version == "5" else 4,
    )


def _secret(method: str, name: str, credentials: Credentials) -> tuple[str | None, str | None]:
    """The MQTT username and password a method sends (none for mutual TLS)."""
    creds, user, secret_env = credentials.creds, credentials.user, credentials.secret_env
    token_file = credentials.token_file
    if method == "jwt":
        from provisioning.errors import ProvisioningError
        from provisioning.tokens import token_for_credentials

        assert creds is not None  # noqa: S101 - checked by login()
        try:
            token, _ = token_for_credentials(
                creds, name, ttl=credentials.ttl, audience=credentials.audience
            )
        except ProvisioningError as exc:
            raise ClientError(str(exc)) from None
        return None, token
    if method in ("password", "scram"):
        if not user or not secret_env:
            msg = f"--auth {method} needs --user NAME and --secret-env VAR"
            raise ClientError(msg)
        secret = os.environ.get(secret_env)
        if not secret:
            msg = f"environment variable {secret_env} is not set (it holds the secret)"
            raise ClientError(msg)
        return user, secret
    if method == "oidc":
        if token_file is None:
            msg = "--auth oidc needs --token-file FILE"
            raise ClientError(msg)
        try:
            return user, token_file.read_text().strip()
        except OSError as exc:
            msg = f"cannot read {token_file}: {exc.strerror or exc}"
            raise ClientError(msg) from None
    return None, None


def _identity(creds: Path) -> dict[str, object]:
    from provisioning.errors import ProvisioningError
    from provisioning.tokens import read_identity

    try:
        return read_identity(creds)
    except ProvisioningError as exc:
        raise ClientError(str(exc)) from None


def _address(text: str) -> tuple[str, int]:
    if not text:
        msg = "--broker HOST:PORT is needed (identity.json names no broker)"
        raise ClientError(msg)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"--broker {text!r}: expected HOST:PORT"
        raise ClientError(msg)
    return host.strip("[]"), int(port)


def _context(trust: Path, creds: Path | None) -> ssl.SSLContext:
    """Verify the broker against ``trust``; present the credential directory's chain for mTLS."""
    from provisioning.errors import ProvisioningError
    from provisioning.tls import client_context

    try:
        if creds is None:
            return client_context(trust=trust)
        return client_context(
            trust=trust, cert_chain=creds / "device.crt", key=creds / "device.key"
        )
    except ProvisioningError as exc:
        raise ClientError(str(exc)) from None


class Session:
    """A connected paho client; refusals and losses become ClientError lines."""

    def __init__(self, spec: Login) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.spec = spec
        protocol = paho.MQTTv5 if spec.version == 5 else paho.MQTTv311
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=spec.client_id,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(spec.context)
        if spec.password is not None or spec.username is not None:
            self.client.username_pw_set(spec.username or spec.client_id, spec.password)
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.close_reason: ReasonCode | None = None
        # MQTT 5: the PUBACK / PUBREC reason code per message id (a refusal is 0x87, not a close)
        self.acks: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        self.connack = reason
        self.connected.set()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        self.acks[mid] = reason

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object
    ) -> None:
        self.close_reason = reason
        self.closed.set()

    @property
    def where(self) -> str:
        return f"{self.spec.host}:{self.spec.port}"

    def open(self) -> None:
        try:
            self.client.connect(self.spec.host, self.spec.port, keepalive=30)
        except ssl.SSLCertVerificationError as exc:
            msg = f"the broker at {self.where} failed verification: {exc.verify_message}"
            raise ClientError(msg) from None
        except ssl.SSLError as exc:
            msg = f"TLS with {self.where} failed: {exc.reason or exc}"
            raise ClientError(msg) from None
        except OSError as exc:
            msg = f"cannot connect to {self.where}: {exc.strerror or exc}"
            raise ClientError(msg) from None
        self.client.loop_start()
        deadline = time.monotonic() + _CONNECT_TIMEOUT
        while not (self.connected.is_set() or self.closed.is_set()):
            if time.monotonic() > deadline:
                msg = f"no CONNACK from {self.where} within {_CONNECT_TIMEOUT:.0f} s"
                raise ClientError(msg)
            time.sleep(0.01)
        if self.connack is None:
            hint = " (does this listener want a client certificate? try --creds)"
            hint = hint if self.spec.method != "mtls" else ""
            msg = f"{self.where} closed the connection before CONNACK{hint}"
            raise ClientError(msg)
        if self.connack.is_failure:
            msg = f"refused by the broker: {describe(self.connack, self.spec.version)}"
            raise ClientError(msg)

    def lost(self) -> ClientError:
        reason = describe(self.close_reason, self.spec.version)
        return ClientError(f"the broker closed the connection: {reason}")

    def close(self) -> None:
        if self.connected.is_set() and not self.closed.is_set():
            self.client.disconnect()
            self.closed.wait(2)
        self.client.loop_stop()


# paho reports an MQTT 3.1.1 CONNACK return code as the MQTT 5 reason code of the same meaning;
# a 3.1.1 user should see the code the broker sent.
_V311_CONNACK = {0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5}


def describe(reason: ReasonCode | None, version: int) -> str:
    """``CONNACK 5 (not authorized)`` on 3.1.1, ``0x87 not authorized`` on MQTT 5."""
    if reason is None:
        return "no reason given"
    from paho.mqtt.packettypes import PacketTypes

    name = str(reason).lower()
    if version != 5 and reason.packetType == PacketTypes.CONNACK:
        code = _V311_CONNACK.get(int(reason.value))
        if code is not None:
            return f"CONNACK {code} ({name})"
    if version != 5 and int(reason.value) in (0, 0x80):
        # A 3.1.1 broker sends no reason with a close: say so instead of paho's guess.
        return "closed without a reason (a denied publish or subscription, or a revocation)"
    return f"0x{int(reason.value):02x} {name}"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@mqtt_app.command("pub")
def pub(
    topic: TopicOpt,
    message: Annotated[
        str | None, typer.Option("-m", "--message", metavar="TEXT", help="Payload.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("-f", "--file", metavar="FILE", help="Payload from a file.")
    ] = None,
    qos: QosOpt = 0,
    retain: Annotated[bool, typer.Option("-r", "--retain", help="Retain the message.")] = False,
    broker: BrokerOpt = None,
    creds: CredsOpt = None,
    auth: AuthOpt = None,
    user: UserOpt = None,
    secret_env: SecretEnvOpt = None,
    token_file: TokenFileOpt = None,
    cafile: CafileOpt = None,
    version: VersionOpt = "311",
    client_id: ClientIdOpt = None,
    ttl: TtlOpt = 3600,
    audience: AudienceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish one message; with QoS 1/2, wait until the broker has it."""
    with _errors():
        if (message is None) == (file is None):
            msg = "give the payload with -m TEXT or -f FILE (one of them)"
            raise ClientError(msg)
        try:
            payload = message.encode() if message is not None else file.read_bytes()  # type: ignore[union-attr]
        except OSError as exc:
            msg = f"cannot read {file}: {exc.strerror or exc}"
            raise ClientError(msg) from None
        spec = login(
            broker=broker,
            credentials=Credentials(
                creds=creds,
                auth=auth,
                user=user,
                secret_env=secret_env,
                token_file=token_file,
                ttl=ttl,
                audience=audience,
            ),
            cafile=cafile,
            version=version,
            client_id=client_id,
        )
        if spec.method == "scram":
            _scram_pub(spec, topic, payload, qos=qos, retain=retain)
            _report_published(spec, topic, payload, qos=qos, retain=retain, as_json=as_json)
            return
        session = Session(spec)
        try:
            session.open()
            info = session.client.publish(topic, payload, qos=qos, retain=retain)
            deadline = time.monotonic() + _CONNECT_TIMEOUT
            while not _published(info):
                if session.closed.is_set():
                    raise session.lost()
                if time.monotonic() > deadline:
                    msg = f"{session.where} did not acknowledge the message"
                    raise ClientError(msg)
                time.sleep(0.005)
            ack = session.acks.get(info.mid)
            if qos and spec.version == 5 and ack is not None and ack.is_failure:
                # an MQTT 5 broker refuses a publish with a reason code and keeps the connection
                msg = f"refused by the broker: {describe(ack, 5)}"
                raise ClientError(msg)
            if qos == 0:
                # QoS 0 has no acknowledgement: a refused publish ends the connection instead.
                session.closed.wait(0.2)
                if session.closed.is_set():
                    raise session.lost()
        finally:
            session.close()
    _report_published(spec, topic, payload, qos=qos, retain=retain, as_json=as_json)


def _report_published(
    spec: Login, topic: str, payload: bytes, *, qos: int, retain: bool, as_json: bool
) -> None:
    if as_json:
        doc = {"topic": topic, "qos": qos, "retain": retain, "bytes": len(payload)}
        print(json.dumps({"published": doc, "method": spec.method, "client_id": spec.client_id}))


@mqtt_app.command("sub")
def sub(
    topics: Annotated[
        list[str], typer.Option("-t", "--topic", metavar="FILTER", help="Filter (repeatable).")
    ],
    qos: QosOpt = 0,
    count: Annotated[
        int | None,
        typer.Option("-C", "--count", min=1, metavar="N", help="Exit after N messages."),
    ] = None,
    wait: Annotated[
        float | None,
        typer.Option("-W", "--timeout", min=0.1, metavar="S", help="Exit after S seconds."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Print the topic before each payload.")
    ] = False,
    broker: BrokerOpt = None,
    creds: CredsOpt = None,
    auth: AuthOpt = None,
    user: UserOpt = None,
    secret_env: SecretEnvOpt = None,
    token_file: TokenFileOpt = None,
    cafile: CafileOpt = None,
    version: VersionOpt = "311",
    client_id: ClientIdOpt = None,
    ttl: TtlOpt = 3600,
    audience: AudienceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Subscribe and print what arrives (one JSON object per message with --json)."""
    with _errors():
        spec = login(
            broker=broker,
            credentials=Credentials(
                creds=creds,
                auth=auth,
                user=user,
                secret_env=secret_env,
                token_file=token_file,
                ttl=ttl,
                audience=audience,
            ),
            cafile=cafile,
            version=version,
            client_id=client_id,
        )
        if spec.method == "scram":
            _scram_sub(spec, topics, qos, count, wait, verbose=verbose, as_json=as_json)
            return
        session = Session(spec)
        received = 0
        granted: dict[int, list[int]] = {}

        def on_subscribe(
            _c: object, _u: object, mid: int, codes: list[ReasonCode], _p: object
        ) -> None:
            granted[mid] = [int(code.value) for code in codes]

        def on_message(_c: object, _u: object, msg: MQTTMessage) -> None:
            nonlocal received
            received += 1
            _print_message(msg, verbose=verbose, as_json=as_json)

        session.client.on_subscribe = on_subscribe
        session.client.on_message = on_message
        try:
            session.open()
            _, mid = session.client.subscribe([(t, qos) for t in topics])
            deadline = time.monotonic() + _CONNECT_TIMEOUT
            while mid not in granted:
                if session.closed.is_set():
                    raise session.lost()
                if time.monotonic() > deadline:
                    msg = f"no SUBACK from {session.where}"
                    raise ClientError(msg)
                time.sleep(0.01)
            _check_granted(topics, granted[mid])
            end = time.monotonic() + wait if wait is not None else None
            while count is None or received < count:
                if session.closed.is_set():
                    raise session.lost()
                if end is not None and time.monotonic() > end:
                    if count is not None:
                        msg = f"received {received} of {count} messages in {wait:g} s"
                        raise ClientError(msg)
                    break
                time.sleep(0.01)
        finally:
            session.close()


def _check_granted(topics: list[str], codes: list[int]) -> None:
    refused = [(t, code) for t, code in zip(topics, codes, strict=False) if code >= 0x80]
    if refused:
        from broker.mqtt import Reason

        topic, code = refused[0]
        # 3.1.1 has one failure code (0x80); MQTT 5 says why (0x87 not authorized ...)
        why = "not authorized" if code == 0x80 else Reason(code).name.lower()
        why = why.replace("_", " ")
        msg = f"subscription refused by the broker (0x{code:02x} {why}): {topic}"
        raise ClientError(msg)


# -- scram: paho has no AUTH packet, so these run on iotauth.scram_client ------------------------


def _scram_client(spec: Login, qos: int) -> ScramMQTTClient:
    if qos == 2:
        msg = "--auth scram speaks QoS 0 and 1 (use -q 0 or -q 1)"
        raise ClientError(msg)
    assert spec.username is not None and spec.password is not None  # noqa: S101, PT018 - login()
    client = ScramMQTTClient(
        spec.host,
        spec.port,
        context=spec.context,
        user=spec.username,
        secret=spec.password,
        client_id=spec.client_id,
        timeout=_CONNECT_TIMEOUT,
    )
    client.connect()
    return client


def _scram_pub(spec: Login, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
    from iotauth.scram_client import describe_code

    client = _scram_client(spec, qos)
    try:
        code = client.publish(topic, payload, qos, retain)
        if code >= 0x80:
            msg = f"refused by the broker: {describe_code(code)}"
            raise ClientError(msg)
        if qos == 0:
            # No acknowledgement at QoS 0: the PINGRESP says the broker read the PUBLISH and kept
            # the connection (a refusal that closes it comes first).
            client.ping()
    finally:
        client.close()


def _scram_sub(
    spec: Login,
    topics: list[str],
    qos: int,
    count: int | None,
    wait: float | None,
    *,
    verbose: bool,
    as_json: bool,
) -> None:
    client = _scram_client(spec, qos)
    try:
        _check_granted(topics, client.subscribe([(t, qos) for t in topics]))
        received = 0
        end = time.monotonic() + wait if wait is not None else None
        while count is None or received < count:
            left = None if end is None else max(0.0, end - time.monotonic())
            message = client.receive(left)
            if message is None:
                if count is not None:
                    msg = f"received {received} of {count} messages in {wait:g} s"
                    raise ClientError(msg)
                break
            received += 1
            _print_message(message, verbose=verbose, as_json=as_json)
    finally:
        client.close()


def _published(info: MQTTMessageInfo) -> bool:
    """paho raises instead of answering False when the connection went away before the message
    left (the broker closed it first, e.g. after a denied publish): that is "not published"."""
    try:
        return info.is_published()
    except RuntimeError:
        return False


def _print_message(msg: MQTTMessage | Publish, *, verbose: bool, as_json: bool) -> None:
    payload = bytes(msg.payload)
    if as_json:
        try:
            text: dict[str, object] = {"payload": payload.decode()}
        except UnicodeDecodeError:
            text = {"payload_base64": base64.b64encode(payload).decode()}
        doc = {"topic": msg.topic, "qos": msg.qos, "retain": bool(msg.retain), **text}
        print(json.dumps(doc), flush=True)
        return
    shown = payload.decode(errors="replace")
    print(f"{msg.topic} {shown}" if verbose else shown, flush=True)
