"""MQTT 5 extended authentication (section 4.12): the AUTH packet, CONNECT's Authentication
Method / Data, as a multi-step exchange in the sans-IO protocol object and through the real
transport, with a toy two-step authenticator defined here (the shipped method, SCRAM-SHA-256, is
tested in test_broker_auth_scram.py).

The toy: the client sends "hello", the broker challenges with a nonce, the client answers
"<nonce>:signed", the broker accepts with "welcome" in the CONNACK. The identity is the client
certificate's, as mutual TLS says (the exchange adds a step, it does not replace the proof).
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from broker import mqtt
from broker.auth import (
    Authenticated,
    AuthStep,
    ConnectionFacts,
    ListenerAuthenticator,
    MutualTLSAuthenticator,
)
from broker.errors import Refused
from broker.mqtt import Properties, Reason
from broker.protocol import AuthContinue, Authenticate, State
from broker.server import BrokerThread
from broker.settings import BrokerSettings
from provisioning.identity import Identity
from tests.broker.broker_helpers import Fleet, tls_socket
from tests.broker.recording_link import DOMAIN, make_core
from tests.broker.test_broker_protocol5 import Client5

METHOD = "TOY-2STEP"


class ToyExchange:
    def __init__(self, inner: MutualTLSAuthenticator, facts: ConnectionFacts) -> None:
        self._inner = inner
        self._facts = facts
        self._round = 0

    async def step(self, data: bytes | None) -> AuthStep:
        self._round += 1
        if self._round == 1 and data == b"hello":
            return AuthStep(data=b"nonce-1")
        if self._round == 2 and data == b"nonce-1:signed":
            return AuthStep(
                data=b"welcome", authenticated=await self._inner.authenticate(self._facts)
            )
        raise Refused("bad-proof", f"round {self._round}", connack=mqtt.CONNACK_BAD_CREDENTIALS)


class ToyAuthenticator:
    """Mutual TLS for plain CONNECTs, and the toy exchange for ``TOY-2STEP``."""

    exchange_methods = frozenset({METHOD})

    def __init__(self) -> None:
        self.inner = MutualTLSAuthenticator(trust_domain=DOMAIN, is_revoked=lambda _s: False)

    async def authenticate(self, facts: ConnectionFacts) -> Authenticated:
        return await self.inner.authenticate(facts)

    def begin(self, method: str, facts: ConnectionFacts) -> ToyExchange:
        if method != METHOD:
            raise Refused("bad-auth-method", method)
        return ToyExchange(self.inner, facts)


# -- the protocol object ---------------------------------------------------------------------------


def _auth(code: int, data: bytes, method: str = METHOD) -> bytes:
    props = Properties(authentication_method=method, authentication_data=data)
    return mqtt.auth5(code, props, from_client=True)


def _start(dev: Client5) -> Authenticate:
    packet = mqtt.Connect(
        5,
        "dev-1",
        True,
        60,
        properties=Properties(authentication_method=METHOD, authentication_data=b"hello"),
    )
    event = dev.feed(mqtt.encode_connect(packet))
    assert isinstance(event, Authenticate)
    return event


def test_an_exchange_challenges_then_connacks_with_the_final_data() -> None:
    """4.12: CONNECT(method, data) -> AUTH 0x18 -> AUTH 0x18 -> CONNACK 0x00 with the method
    and the server's final data (MQTT-4.12.0-1 .. -3)."""
    dev = Client5(make_core())
    event = _start(dev)
    assert dev.protocol.state is State.AUTH
    dev.protocol.challenge(b"nonce-1", 1.0)
    [challenge] = dev.out()
    assert isinstance(challenge, mqtt.Auth)
    assert challenge.reason_code == Reason.CONTINUE_AUTHENTICATION
    assert challenge.properties.authentication_data == b"nonce-1"
    assert dev.protocol.state is State.CHALLENGE
    answer = dev.feed(_auth(0x18, b"nonce-1:signed"))
    assert answer == AuthContinue(METHOD, b"nonce-1:signed")
    identity = Identity.device("dev-1", DOMAIN)
    dev.protocol.authenticated(event.connect, Authenticated(identity, "mtls", "1"), 1.0, b"ok")
    [connack] = dev.out()
    assert connack.reason_code == 0
    assert connack.properties.authentication_method == METHOD
    assert connack.properties.authentication_data == b"ok"
    assert dev.protocol.state is State.LIVE


def test_another_method_mid_exchange_is_a_protocol_error() -> None:
    """MQTT-4.12.0-5 (the method stays); twin above: the same method continues."""
    dev = Client5(make_core())
    _start(dev)
    dev.protocol.challenge(b"nonce-1", 1.0)
    dev.out()
    assert dev.feed(_auth(0x18, b"x", method="OTHER")) is None
    [connack] = dev.out()
    assert connack.reason_code == Reason.PROTOCOL_ERROR
    assert dev.protocol.closed


def test_a_publish_before_the_exchange_ends_is_a_protocol_error() -> None:
    """MQTT-4.12.0-4: only AUTH or DISCONNECT until the CONNACK."""
    dev = Client5(make_core())
    _start(dev)
    dev.protocol.challenge(b"nonce-1", 1.0)
    dev.out()
    dev.feed(mqtt.encode_publish5(b"devices/dev-1/t", b"x", 0, False))
    assert dev.protocol.closed


def test_reauthentication_is_an_event_on_a_live_connection_and_must_keep_the_identity() -> None:
    """4.12.1: AUTH 0x19 -> (AUTH 0x18 ...) -> AUTH 0x00; the connection stays LIVE meanwhile.
    Twin: a re-authentication that proves another identity is DISCONNECT 0x87."""
    core = make_core()
    dev = Client5(core)
    event = _start(dev)
    identity = Identity.device("dev-1", DOMAIN)
    dev.protocol.authenticated(event.connect, Authenticated(identity, "mtls", "1"), 1.0)
    dev.out()
    again = dev.feed(_auth(0x19, b"hello"))
    assert again == AuthContinue(METHOD, b"hello", reauth=True)
    assert dev.protocol.state is State.LIVE
    dev.protocol.challenge(b"nonce-1", 2.0)
    [challenge] = dev.out()
    assert challenge.reason_code == Reason.CONTINUE_AUTHENTICATION
    dev.protocol.reauthenticated(Authenticated(identity, "mtls", "1"), None)
    [success] = dev.out()
    assert (type(success), success.reason_code) == (mqtt.Auth, Reason.SUCCESS)
    dev.feed(_auth(0x19, b"hello"))
    dev.protocol.reauthenticated(Authenticated(Identity.device("dev-2", DOMAIN), "mtls", "2"), None)
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.NOT_AUTHORIZED
    assert dev.protocol.closed


def test_auth_from_a_client_that_used_no_method_is_a_protocol_error() -> None:
    """MQTT-4.12.1-1: re-authentication only with the CONNECT's method."""
    dev = Client5(make_core())
    dev.connect()
    dev.feed(_auth(0x19, b"hello"))
    [disconnect] = dev.out()
    assert disconnect.reason_code == Reason.PROTOCOL_ERROR


def test_a_listener_without_scram_offers_no_method() -> None:
    """Only a listener that lists scram runs an exchange: elsewhere every method is 0x8C."""
    listener = ListenerAuthenticator(frozenset({"mtls"}), {}, {})
    facts = ConnectionFacts("dev-1", None, None, "p", None)
    with pytest.raises(Refused) as refused:
        listener.begin("SCRAM-SHA-256", facts)
    assert refused.value.reason == "bad-auth-method"


# -- through the real transport (TLS, asyncio) ----------------------------------------------------


def _read(sock: ssl.SSLSocket, reader: mqtt.ClientPacketReader) -> Any:
    while True:
        try:
            data = sock.recv(65536)
        except (OSError, ssl.SSLError):
            return None
        if not data:
            return None
        packets = reader.feed(data)
        if packets:
            return packets[0]


@pytest.fixture
def toy_broker(fleet: Fleet) -> Any:
    thread = BrokerThread(
        BrokerSettings(fleet.pki_dir), authenticator=ToyAuthenticator(), audit_sink=lambda _: None
    ).start()
    yield thread
    thread.stop()


def _connect(toy_broker: Any, fleet: Fleet, method: str, data: bytes) -> tuple[Any, Any, Any]:
    sock = tls_socket(toy_broker.port, fleet.creds("dev-1"), root=fleet.pki_dir / "root.crt")
    props = Properties(authentication_method=method, authentication_data=data)
    sock.sendall(mqtt.encode_connect(mqtt.Connect(5, "dev-1", True, 30, properties=props)))
    reader = mqtt.ClientPacketReader(1 << 20, 5)
    return sock, reader, _read(sock, reader)


def test_a_two_step_exchange_through_the_transport(toy_broker: Any, fleet: Fleet) -> None:
    """The real broker runs the toy exchange: AUTH 0x18 nonce, then CONNACK 0x00 "welcome";
    a PUBLISH then flows (PUBACK 0)."""
    sock, reader, challenge = _connect(toy_broker, fleet, METHOD, b"hello")
    try:
        assert isinstance(challenge, mqtt.Auth), challenge
        assert challenge.properties.authentication_data == b"nonce-1"
        sock.sendall(_auth(0x18, b"nonce-1:signed"))
        connack = _read(sock, reader)
        assert isinstance(connack, mqtt.Connack), connack
        assert connack.reason_code == 0
        assert connack.properties.authentication_data == b"welcome"
        sock.sendall(mqtt.encode_publish5(b"devices/dev-1/t", b"x", 1, False, 1))
        ack = _read(sock, reader)
        assert (ack.kind, ack.reason_code) == (mqtt.PUBACK, 0)
    finally:
        sock.close()


def test_a_wrong_answer_is_connack_0x86(toy_broker: Any, fleet: Fleet) -> None:
    """Twin: a wrong response ends the exchange with Bad user name or password."""
    sock, reader, challenge = _connect(toy_broker, fleet, METHOD, b"hello")
    try:
        assert isinstance(challenge, mqtt.Auth)
        sock.sendall(_auth(0x18, b"forged"))
        connack = _read(sock, reader)
        assert connack.reason_code == Reason.BAD_USER_NAME_OR_PASSWORD
        assert _read(sock, reader) is None
    finally:
        sock.close()


def test_an_unknown_method_is_connack_0x8c(toy_broker: Any, fleet: Fleet) -> None:
    sock, _reader, connack = _connect(toy_broker, fleet, "NOPE", b"")
    try:
        assert connack.reason_code == Reason.BAD_AUTHENTICATION_METHOD
    finally:
        sock.close()
