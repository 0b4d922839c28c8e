"""The scram method: SCRAM-SHA-256 over MQTT 5 enhanced authentication (4.12), end to end.

The real broker runs an mTLS listener and a ``scram`` listener (``--listen 0:mtls --listen
0:scram``) over real TLS; the service's secret comes from ``iotauth service secret`` and the
registry holds only its verifier. Services connect with :class:`iotauth.scram_client.
ScramMQTTClient` (paho has no AUTH exchange); raw MQTT 5 packets from our codec play the broken
and hostile clients, and a test-side TLS server plays a broker that does not know the verifier.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scramp import ScramClient, ScramMechanism

from broker import mqtt
from broker.auth import ListenerAuthenticator
from broker.auth_password import Backoff, SecretSource
from broker.auth_scram import ScramAuthenticator
from broker.mqtt import Properties, Reason
from broker.settings import DEFAULT_METHODS_BY_KIND, BrokerSettings, ListenerSpec
from iotauth.scram_client import ClientError, ScramMQTTClient
from provisioning.tls import client_context, server_context_for_pki
from tests.broker.broker_helpers import (
    AuditedBroker,
    FakeClock,
    Fleet,
    Peer,
    service_secret,
    tls_socket,
    wait_until,
)
from tests.conftest import Result

MTLS = ListenerSpec(0, frozenset({"mtls"}))
SCRAM = ListenerSpec(0, frozenset({"scram"}))
PASSWORD = ListenerSpec(0, frozenset({"password"}))
METHOD = "SCRAM-SHA-256"


class Broker(AuditedBroker):
    def __init__(self, fleet: Fleet, *specs: ListenerSpec, **kw: Any) -> None:
        listeners = specs or (MTLS, SCRAM, PASSWORD)
        super().__init__(BrokerSettings(fleet.pki_dir, listeners=listeners), **kw)


@pytest.fixture
def broker(fleet: Fleet) -> Iterator[Broker]:
    b = Broker(fleet)
    yield b
    b.thread.stop()


@pytest.fixture
def scram(fleet: Fleet) -> Iterator[Callable[..., ScramMQTTClient]]:
    made: list[ScramMQTTClient] = []

    def make(port: int, user: str, secret: str, **kw: Any) -> ScramMQTTClient:
        ctx = client_context(trust=fleet.pki_dir / "root.crt")
        client = ScramMQTTClient("127.0.0.1", port, context=ctx, user=user, secret=secret, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


class Raw:
    """A hand-driven MQTT 5 connection over server-authenticated TLS (the broken clients)."""

    def __init__(self, fleet: Fleet, port: int) -> None:
        ctx = client_context(trust=fleet.pki_dir / "root.crt")
        self.sock = tls_socket(port, None, root=fleet.pki_dir / "root.crt", context=ctx)
        self.reader = mqtt.ClientPacketReader(1 << 20, 5)
        self.pending: list[Any] = []

    def connect(
        self, client_first: bytes | None, *, method: str = METHOD, cid: str = "dash"
    ) -> Any:
        props = Properties(authentication_method=method, authentication_data=client_first)
        self.sock.sendall(mqtt.encode_connect(mqtt.Connect(5, cid, True, 30, properties=props)))
        return self.read()

    def auth(self, data: bytes, *, method: str = METHOD, code: int = 0x18) -> Any:
        props = Properties(authentication_method=method, authentication_data=data)
        self.sock.sendall(mqtt.auth5(code, props, from_client=True))
        return self.read()

    def read(self) -> Any:
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except (OSError, ssl.SSLError):
                return None
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(fleet: Fleet) -> Iterator[Callable[[int], Raw]]:
    made: list[Raw] = []

    def make(port: int) -> Raw:
        made.append(Raw(fleet, port))
        return made[-1]

    yield make
    for r in made:
        r.close()


# -- success, and the same isolation as mutual TLS -------------------------------------------------


def test_a_scram_service_proves_itself_and_gets_exactly_the_service_grants(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    scram: Callable[..., ScramMQTTClient],
    peers: Callable[..., Peer],
) -> None:
    """CONNECT (client-first) -> AUTH 0x18 (server-first) -> AUTH 0x18 (client-final) ->
    CONNACK 0x00 with the server-final (MQTT-4.12.0-2, -3, -5); then the service's ACL."""
    mtls_port, scram_port, _ = broker.ports
    secret = service_secret(cli, fleet, "dash")
    dev = peers(mtls_port, "dev-1").connect()
    svc = scram(scram_port, "dash", secret)
    svc.connect()  # returns only once the server signature checked out
    assert svc.subscribe([("devices/+/telemetry/#", 1)]) == [1]
    # Deny by default: not a device's subtree nor the renewal service's topics (MQTT 5: 0x87).
    assert svc.subscribe([("devices/dev-1/certs/csr", 1)]) == [Reason.NOT_AUTHORIZED]
    assert svc.subscribe([("#", 1)]) == [Reason.NOT_AUTHORIZED]
    assert dev.subscribe("devices/dev-1/commands/#", qos=1) == [1]
    assert svc.publish("devices/dev-1/commands/reboot", b"now", qos=1) == 0
    assert wait_until(lambda: ("devices/dev-1/commands/reboot", b"now", False) in dev.messages)
    dev.publish("devices/dev-1/telemetry/t", b"20", qos=1)
    message = svc.receive(timeout=5)
    assert message is not None
    assert (message.topic, message.payload) == ("devices/dev-1/telemetry/t", b"20")
    # A publish outside the grants: PUBACK 0x87 on MQTT 5, nothing delivered.
    assert svc.publish("devices/dev-1/telemetry/fake", b"x", qos=1) == Reason.NOT_AUTHORIZED
    connects = [r for r in broker.audit if r["event"] == "connect" and r.get("identity")]
    assert any(
        r.get("method") == "scram"
        and r["identity"].endswith("/service/dash")
        and r.get("credential") == "dash#1"
        for r in connects
    )
    metrics = broker.thread.broker.metrics
    assert metrics.value("iotauth_broker_authentications_total", method="scram") == 1
    assert not wait_until(lambda: any(m[0].endswith("fake") for m in dev.messages), 0.3)


def test_the_secret_is_never_sent(
    fleet: Fleet, cli: Callable[..., Result], raw: Callable[[int], Raw], broker: Broker
) -> None:
    """What crosses the wire is the client-first and the client-final (nonce and proof):
    nothing of the secret."""
    secret = service_secret(cli, fleet, "dash")
    client = ScramClient([METHOD], "dash", secret)
    conn = raw(broker.ports[1])
    sent = [client.get_client_first().encode()]
    first = conn.connect(sent[0])
    assert isinstance(first, mqtt.Auth), first
    assert first.reason_code == Reason.CONTINUE_AUTHENTICATION
    assert first.properties.authentication_method == METHOD  # MQTT-4.12.0-5
    server_first = first.properties.authentication_data.decode()
    assert ",i=4096" in server_first  # the stored iteration count, RFC 7677's minimum
    client.set_server_first(server_first)
    sent.append(client.get_client_final().encode())
    connack = conn.auth(sent[1])
    assert isinstance(connack, mqtt.Connack), connack
    assert connack.reason_code == 0
    assert connack.properties.authentication_method == METHOD  # MQTT-4.12.0-5
    client.set_server_final(connack.properties.authentication_data.decode())  # raises if forged
    assert all(secret.encode() not in data for data in sent)


def test_the_broker_side_runs_no_pbkdf2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PBKDF2 of the secret is the client's work: with hashlib's PBKDF2 made to fail, the
    broker's two steps still succeed (stored keys only). Twin: the same patch does stop the
    password method's check, which must derive the key from the password."""
    import asyncio
    import datetime as dt
    import hashlib

    from broker.auth import ConnectionFacts
    from provisioning.service_secrets import check_secret, make_verifier

    record = make_verifier("dash", "s3cret", version=1, now=dt.datetime.now(dt.UTC))

    async def lookup(_name: str) -> Any:
        return record

    auth = ScramAuthenticator(trust_domain="fleet.example", secret=lookup)
    client = ScramClient([METHOD], "dash", "s3cret")
    client_first = client.get_client_first().encode()
    exchange = auth.begin(METHOD, ConnectionFacts("dash", None, None, "127.0.0.1:1", None))

    def no_pbkdf2(*_args: object) -> bytes:
        raise AssertionError("PBKDF2 in the broker")

    with monkeypatch.context() as patch:  # the broker's first step
        patch.setattr(hashlib, "pbkdf2_hmac", no_pbkdf2)
        first = asyncio.run(exchange.step(client_first))
    client.set_server_first(bytes(first.data or b"").decode())
    client_final = client.get_client_final().encode()  # the client's PBKDF2, unpatched
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", no_pbkdf2)  # the broker's second step
    done = asyncio.run(exchange.step(client_final))
    assert done.authenticated is not None
    client.set_server_final(bytes(done.data or b"").decode())
    assert not check_secret(record, "s3cret")  # the twin: the patch bites where PBKDF2 runs


# -- negative twins --------------------------------------------------------------------------------


def test_a_wrong_secret_and_an_unknown_name_fail_alike_and_are_audited_apart(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    scram: Callable[..., ScramMQTTClient],
    raw: Callable[[int], Raw],
) -> None:
    """MQTT-4.12.0-4: the server rejects with a CONNACK >= 0x80 and closes. A caller cannot tell
    a wrong secret from a name that does not exist: same code, same reason string, and the
    unknown name's salt is as stable as a real one's."""
    port = broker.ports[1]
    secret = service_secret(cli, fleet, "dash")
    errors = []
    for user, guess in (("dash", secret + "x"), ("nobody", secret)):
        with pytest.raises(ClientError) as info:
            scram(port, user, guess).connect()
        errors.append(str(info.value))
    assert errors[0] == errors[1] == "refused by the broker: 0x87 not authorized (scram-failed)"
    details = [r["detail"] for r in broker.refusal_records() if r["reason"] == "scram-failed"]
    assert details[0].startswith("wrong proof for service dash")
    assert details[1].startswith("service nobody has no secret")

    def salt_of(user: str) -> str:
        conn = raw(port)
        first = conn.connect(ScramClient([METHOD], user, "x").get_client_first().encode())
        conn.close()
        assert isinstance(first, mqtt.Auth), first
        fields = dict(
            f.split("=", 1) for f in first.properties.authentication_data.decode().split(",")
        )
        return fields["s"]

    assert salt_of("nobody") == salt_of("nobody")  # stable, as a real verifier's salt is
    assert salt_of("nobody") != salt_of("someone-else")
    assert salt_of("dash") == salt_of("dash")
    # The right secret still works (the refusals above were not backoffs).
    scram(port, "dash", secret).connect()


_AuthInfo = tuple[bytes, bytes, bytes, int]


def _fake_broker(fleet: Fleet, info: _AuthInfo, answer: Callable[[Any, str], bytes]) -> Any:
    """A TLS server with the real broker certificate that runs SCRAM with the verifier ``info``
    (scramp's ScramServer) and puts ``answer(server, client_final)`` in its CONNACK; records what
    the client sends after the CONNACK."""
    ctx = server_context_for_pki(fleet.pki_dir, client_certificates="none")
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {"after_connack": None}

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            reader = mqtt.PacketReader(1 << 20)
            packets: list[Any] = []

            def read() -> Any:
                while not packets:
                    data = tls.recv(65536)
                    if not data:
                        return None
                    packets.extend(reader.feed(data))
                return packets.pop(0)

            server = ScramMechanism(METHOD).make_server(lambda _u: info)
            server.set_client_first(read().properties.authentication_data.decode())
            first = server.get_server_first().encode()
            props = Properties(authentication_method=METHOD, authentication_data=first)
            tls.sendall(mqtt.auth5(Reason.CONTINUE_AUTHENTICATION, props))
            data = answer(server, read().properties.authentication_data.decode())
            props = Properties(authentication_method=METHOD, authentication_data=data or None)
            tls.sendall(mqtt.connack5(False, 0, props))
            try:
                seen["after_connack"] = tls.recv(65536)
            except (OSError, ssl.SSLError):
                seen["after_connack"] = b""

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, seen


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("forged-signature", "server signature does not match"),
        ("no-server-final", "has no SCRAM message"),
    ],
)
def test_a_broker_that_does_not_know_the_verifier_is_detected_and_gets_nothing_more(
    fleet: Fleet,
    cli: Callable[..., Result],
    scram: Callable[..., ScramMQTTClient],
    case: str,
    words: str,
) -> None:
    """RFC 5802 section 9: the client checks ServerSignature; a broker with a valid TLS
    certificate but not the verifier (it made one up) cannot make it. The client aborts
    (ClientError) and sends no DISCONNECT, SUBSCRIBE or PUBLISH after the CONNACK: the socket
    just closes."""
    secret = service_secret(cli, fleet, "dash")

    def answer(_server: Any, _final: str) -> bytes:
        # It cannot check the proof either; it says yes with a signature of its own.
        return b"v=" + b"A" * 43 + b"=" if case == "forged-signature" else b""

    made_up = ScramMechanism(METHOD).make_auth_info("not the secret")
    listener, thread, seen = _fake_broker(fleet, made_up, answer)
    try:
        client = scram(listener.getsockname()[1], "dash", secret)
        with pytest.raises(ClientError) as info:
            client.connect()
        assert words in str(info.value)
        assert "aborted the connection" in str(info.value)
        thread.join(10)
        assert seen["after_connack"] == b""  # nothing more: end of stream
    finally:
        listener.close()


def test_the_fake_broker_twin_with_the_real_verifier_is_trusted(
    fleet: Fleet, cli: Callable[..., Result], scram: Callable[..., ScramMQTTClient]
) -> None:
    """Twin of the test above: the same test-side server, given the registry's verifier, makes
    a server signature the client accepts, so the detection above is the verifier's doing."""
    import base64

    secret = service_secret(cli, fleet, "dash")
    record = fleet.pki.service_secret("dash")
    assert record is not None
    info = (
        base64.b64decode(record.salt),
        base64.b64decode(record.stored_key),
        base64.b64decode(record.server_key),
        record.iterations,
    )

    def answer(server: Any, final: str) -> bytes:
        server.set_client_final(final)
        return str(server.get_server_final()).encode()

    listener, thread, seen = _fake_broker(fleet, info, answer)
    try:
        client = scram(listener.getsockname()[1], "dash", secret)
        client.connect()
        client.close()
        thread.join(10)
        assert seen["after_connack"] == b"\xe0\x00"  # our DISCONNECT, after trusting it
    finally:
        listener.close()


def test_scram_where_the_listener_does_not_list_it_is_0x8c(
    broker: Broker, fleet: Fleet, cli: Callable[..., Result], scram: Callable[..., ScramMQTTClient]
) -> None:
    """Downgrade twin: the password-only listener offers no exchange (MQTT-4.12.0-1: 0x8C and
    the connection closed), whatever the secret."""
    secret = service_secret(cli, fleet, "dash")
    with pytest.raises(ClientError) as info:
        scram(broker.ports[2], "dash", secret).connect()
    assert "0x8c bad authentication method" in str(info.value)
    assert wait_until(lambda: "bad-auth-method" in broker.refusals())


def test_plain_connects_on_the_scram_listener_are_refused_by_method(
    broker: Broker, fleet: Fleet, cli: Callable[..., Result]
) -> None:
    """An MQTT 3.1.1 client cannot run SCRAM (it has no AUTH packet): its username/password
    CONNECT on the scram-only listener is a password attempt that listener does not take
    (3.1.1 CONNACK 5); an MQTT 5 CONNECT without an Authentication Method gets 0x8C."""
    secret = service_secret(cli, fleet, "dash")
    port = broker.ports[1]
    for level in (4, 5):
        sock = tls_socket(port, None, root=fleet.pki_dir / "root.crt")
        try:
            connect = mqtt.Connect(
                level, "dash", True, 30, username="dash", password=secret.encode()
            )
            sock.sendall(mqtt.encode_connect(connect))
            connack = mqtt.ClientPacketReader(1 << 16, level).feed(sock.recv(1024))[0]
            expected = (
                mqtt.CONNACK_NOT_AUTHORIZED if level == 4 else Reason.BAD_AUTHENTICATION_METHOD
            )
            assert connack.reason_code == expected
        finally:
            sock.close()
    refusals = [r for r in broker.refusal_records() if r["reason"] == "method-not-allowed"]
    assert len(refusals) == 2
    assert "(scram); scram needs MQTT 5" in refusals[0]["detail"]


def test_a_device_identity_cannot_use_scram(broker: Broker, raw: Callable[[int], Raw]) -> None:
    """A device proves itself with its own key, never a shared secret: 0x8C method-not-allowed,
    before any verifier is read."""
    conn = raw(broker.ports[1])
    user = "spiffe://fleet.example/device/dev-1"
    connack = conn.connect(
        ScramClient([METHOD], user, "x").get_client_first().encode(), cid="dev-1"
    )
    assert isinstance(connack, mqtt.Connack), connack
    assert connack.reason_code == Reason.BAD_AUTHENTICATION_METHOD
    assert connack.properties.reason_string == "method-not-allowed"
    assert wait_until(lambda: "method-not-allowed" in broker.refusals())
    # Twin: the same name spelled as this trust domain's service gets a challenge.
    ok = raw(broker.ports[1]).connect(
        ScramClient([METHOD], "spiffe://fleet.example/service/dash", "x")
        .get_client_first()
        .encode()
    )
    assert isinstance(ok, mqtt.Auth)


@pytest.mark.parametrize(
    ("client_first", "reason"),
    [
        (None, "scram-malformed"),  # no Authentication Data at all
        (b"hello", "scram-malformed"),
        (b"n,,n=dash", "scram-malformed"),  # no nonce
        (b"n,,n=dash,r=" + b"x" * 2000, "scram-malformed"),  # not a SCRAM message's size
        (b"\xff\xfe", "scram-malformed"),  # not UTF-8
        (b"p=tls-unique,,n=dash,r=abc", "scram-malformed"),  # channel binding: not offered
        (b"n,,n=a/b,r=abc", "scram-bad-username"),
    ],
)
def test_a_malformed_client_first_is_refused(
    broker: Broker, raw: Callable[[int], Raw], client_first: bytes | None, reason: str
) -> None:
    connack = raw(broker.ports[1]).connect(client_first)
    assert isinstance(connack, mqtt.Connack), connack
    assert connack.reason_code >= 0x80  # MQTT-4.12.0-4
    assert connack.properties.reason_string == reason
    assert wait_until(lambda: reason in broker.refusals())


def test_a_malformed_client_final_is_refused_and_counts_as_a_failure(
    broker: Broker, fleet: Fleet, cli: Callable[..., Result], raw: Callable[[int], Raw]
) -> None:
    service_secret(cli, fleet, "dash")
    for final in (b"garbage", b"c=biws,r=wrong-nonce,p=AAAA", b"\xff"):
        conn = raw(broker.ports[1])
        first = conn.connect(ScramClient([METHOD], "dash", "x").get_client_first().encode())
        assert isinstance(first, mqtt.Auth)
        connack = conn.auth(final)
        assert isinstance(connack, mqtt.Connack), connack
        assert connack.reason_code == Reason.NOT_AUTHORIZED
        assert conn.read() is None  # closed (MQTT-4.12.0-4)
    assert broker.refusals().count("scram-failed") + broker.refusals().count("scram-malformed") == 3


@pytest.mark.parametrize(
    ("method", "code"),
    [("SCRAM-SHA-1", 0x18), (METHOD, 0x19)],
    ids=["another-method", "re-authenticate-before-connack"],
)
def test_auth_with_another_method_or_code_mid_exchange_is_a_protocol_error(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    raw: Callable[[int], Raw],
    method: str,
    code: int,
) -> None:
    """MQTT-4.12.0-5: every AUTH of the exchange carries the CONNECT's method; MQTT-4.12.0-3:
    the client's answer is 0x18. Anything else is CONNACK 0x82 and the connection closed."""
    secret = service_secret(cli, fleet, "dash")
    client = ScramClient([METHOD], "dash", secret)
    conn = raw(broker.ports[1])
    first = conn.connect(client.get_client_first().encode())
    client.set_server_first(first.properties.authentication_data.decode())
    connack = conn.auth(client.get_client_final().encode(), method=method, code=code)
    assert isinstance(connack, mqtt.Connack), connack
    assert connack.reason_code == Reason.PROTOCOL_ERROR
    assert conn.read() is None


def test_a_publish_before_connack_is_a_protocol_error(
    broker: Broker, fleet: Fleet, cli: Callable[..., Result], raw: Callable[[int], Raw]
) -> None:
    """MQTT-3.1.2-30: with an Authentication Method a client sends only AUTH or DISCONNECT
    until CONNACK."""
    service_secret(cli, fleet, "dash")
    conn = raw(broker.ports[1])
    first = conn.connect(ScramClient([METHOD], "dash", "x").get_client_first().encode())
    assert isinstance(first, mqtt.Auth)
    conn.sock.sendall(mqtt.encode_publish5(b"devices/x", b"early", 0, False))
    connack = conn.read()
    assert isinstance(connack, mqtt.Connack), connack
    assert connack.reason_code == Reason.PROTOCOL_ERROR


def test_rotation_and_revocation_kick_live_scram_sessions_within_one_second(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    scram: Callable[..., ScramMQTTClient],
) -> None:
    port = broker.ports[1]
    old = service_secret(cli, fleet, "dash")
    keep = service_secret(cli, fleet, "grafana")
    live = scram(port, "dash", old)
    live.connect()
    other = scram(port, "grafana", keep)
    other.connect()
    new = service_secret(cli, fleet, "dash")  # rotation
    with pytest.raises(ClientError) as kicked:
        live.receive(timeout=1.0)
    assert "0x87 not authorized" in str(kicked.value)
    kicks = [r for r in broker.audit if r["event"] == "kick"]
    assert any(r["reason"] == "secret-revoked" and r.get("credential") == "dash#1" for r in kicks)
    with pytest.raises(ClientError):
        scram(port, "dash", old).connect()  # the old secret opens nothing now
    again = scram(port, "dash", new)
    again.connect()
    cli("service", "revoke", "dash", "--pki", str(fleet.pki_dir), check=True)
    with pytest.raises(ClientError):
        again.receive(timeout=1.0)
    with pytest.raises(ClientError) as refused:
        scram(port, "dash", new).connect()
    assert "scram-failed" in str(refused.value)
    assert any("is revoked" in r["detail"] for r in broker.refusal_records())
    other.ping()  # the twin that nobody rotated stays connected


def test_repeated_failures_are_backed_off_unchecked_then_the_secret_works(
    fleet: Fleet, cli: Callable[..., Result], scram: Callable[..., ScramMQTTClient]
) -> None:
    """The password method's backoff: three free failures, then refused before the
    server-first (``auth-backoff``, 0x87), the right secret too, until the backoff ends."""
    secret = service_secret(cli, fleet, "dash")
    clock = FakeClock()
    source = SecretSource(fleet.pki_dir)
    auth = ListenerAuthenticator(
        frozenset({"scram"}),
        {
            "scram": ScramAuthenticator(
                trust_domain="fleet.example", secret=source.secret, backoff=Backoff(clock=clock)
            )
        },
        dict(DEFAULT_METHODS_BY_KIND),
    )
    b = AuditedBroker(BrokerSettings(fleet.pki_dir, listeners=(SCRAM,)), authenticator=auth)
    try:
        for n in range(10):
            with pytest.raises(ClientError):
                scram(b.thread.port, "dash", f"guess-{n}").connect()
        reasons = b.refusals()
        assert reasons == ["scram-failed"] * 4 + ["auth-backoff"] * 6
        assert any("backed off for 1 s" in r["detail"] for r in b.refusal_records())
        with pytest.raises(ClientError) as early:
            scram(b.thread.port, "dash", secret).connect()
        assert "0x87 not authorized (auth-backoff)" in str(early.value)
        clock.now += 1.5  # the first backoff (1 s) is over
        scram(b.thread.port, "dash", secret).connect()
    finally:
        b.thread.stop()
        source.close()


def test_password_guesses_back_off_scram_too(
    broker: Broker,
    fleet: Fleet,
    cli: Callable[..., Result],
    scram: Callable[..., ScramMQTTClient],
    peers: Callable[..., Peer],
) -> None:
    """One backoff for both ways a secret is checked: guessing by password does not open a
    fresh budget on the scram listener."""
    secret = service_secret(cli, fleet, "dash")
    for n in range(4):
        peer = peers(broker.ports[2], None, "dash", context=client_context(
            trust=fleet.pki_dir / "root.crt"))  # fmt: skip
        peer.client.username_pw_set("dash", f"guess-{n}")
        assert peer.connect(expect_ok=False).refused
    with pytest.raises(ClientError) as info:
        scram(broker.ports[1], "dash", secret).connect()
    assert "auth-backoff" in str(info.value)


def test_reauthentication_runs_scram_again_on_the_live_connection(
    broker: Broker, fleet: Fleet, cli: Callable[..., Result], raw: Callable[[int], Raw]
) -> None:
    """MQTT-4.12.1-1: AUTH 0x19 with the CONNECT's method starts SCRAM again; the broker's
    server-final comes in AUTH 0x00. Twin: re-authenticating with a wrong secret is DISCONNECT
    0x87 (MQTT-4.12.1-2)."""
    secret = service_secret(cli, fleet, "dash")
    conn = raw(broker.ports[1])

    def run(first_code: int, password: str, *, connect: bool) -> Any:
        client = ScramClient([METHOD], "dash", password)
        client_first = client.get_client_first().encode()
        step = conn.connect(client_first) if connect else conn.auth(client_first, code=first_code)
        assert isinstance(step, mqtt.Auth), step
        client.set_server_first(step.properties.authentication_data.decode())
        done = conn.auth(client.get_client_final().encode())
        if isinstance(done, mqtt.Connack | mqtt.Auth) and not done.reason_code:
            client.set_server_final(done.properties.authentication_data.decode())
        return done

    assert run(0, secret, connect=True).reason_code == 0  # CONNACK
    again = run(Reason.RE_AUTHENTICATE, secret, connect=False)
    assert isinstance(again, mqtt.Auth)
    assert again.reason_code == Reason.SUCCESS
    wrong = run(Reason.RE_AUTHENTICATE, secret + "x", connect=False)
    assert isinstance(wrong, mqtt.Disconnect)
    assert wrong.reason_code == Reason.NOT_AUTHORIZED


def test_broker_explain_lists_scram_for_services_only(
    fleet: Fleet, cli: Callable[..., Result]
) -> None:
    service_secret(cli, fleet, "dash")
    fleet.creds("dev-1")
    pki = str(fleet.pki_dir)
    listen = ("--listen", "8883:mtls", "--listen", "8884:scram,password", "--listen", "8885:jwt")
    svc = cli("broker", "explain", "--pki", pki, "--identity", "dash", "--service",
              "--subscribe", "devices/+/telemetry/#", *listen, "--json", check=True)  # fmt: skip
    doc = json.loads(svc.stdout)
    # dash holds a secret and no certificate: mtls is not among its methods anywhere
    assert doc["methods"] == {"8883": [], "8884": ["password", "scram"], "8885": []}
    assert "(scram, password)" in doc["warnings"][0]
    dev = cli("broker", "explain", "--pki", pki, "--identity", "dev-1",
              "--subscribe", "devices/dev-1/#", *listen, check=True)  # fmt: skip
    assert "methods on 8884: none\n" in dev.stdout
    assert "scram" not in dev.stdout  # a device never uses a shared secret
