"""``iotauth mqtt pub|sub`` against the real broker: every method it speaks, and its refusals."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.server import BrokerThread
from broker.settings import BrokerSettings, ListenerSpec
from tests.broker.broker_helpers import Fleet
from tests.conftest import CLI, Result, assert_one_line_error


@pytest.fixture
def ports(fleet: Fleet) -> Iterator[dict[str, int]]:
    specs = (ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"jwt"})))
    thread = BrokerThread(
        BrokerSettings(fleet.pki_dir, listeners=specs), audit_sink=lambda _: None
    ).start()
    bound = list(thread.broker.ports.values())
    yield {"mtls": bound[0], "jwt": bound[1]}
    thread.stop()


@pytest.fixture
def mqtt(tmp_path: Path) -> Callable[..., Result]:
    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [*CLI, "mqtt", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def test_a_token_device_publishes_and_a_certificate_service_receives(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    dev, sink = fleet.creds("dev-1"), fleet.creds("sink", service=True)
    jwt_broker, mtls_broker = f"127.0.0.1:{ports['jwt']}", f"127.0.0.1:{ports['mtls']}"
    published = mqtt(
        "pub", "--broker", jwt_broker, "--creds", str(dev), "--auth", "jwt",
        "-t", "devices/dev-1/state", "-m", "online", "-q", "1", "-r", "--json",
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    doc = json.loads(published.stdout)
    assert doc["method"] == "jwt"
    assert doc["client_id"] == "dev-1"
    # The retained message is there for a subscriber that comes later: no race with the publish.
    received = mqtt(
        "sub", "--broker", mtls_broker, "--creds", str(sink),
        "-t", "devices/+/state", "-C", "1", "-W", "20", "--json",
    )  # fmt: skip
    assert received.returncode == 0, received.stderr
    message = json.loads(received.stdout.splitlines()[0])
    assert message == {
        "topic": "devices/dev-1/state",
        "qos": 0,
        "retain": True,
        "payload": "online",
    }


def test_a_denied_publish_is_one_line(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    result = mqtt(
        "pub", "--broker", f"127.0.0.1:{ports['mtls']}", "--creds", str(fleet.creds("dev-1")),
        "-t", "devices/dev-2/commands/x", "-m", "no", "-q", "1",
    )  # fmt: skip
    assert_one_line_error(result, "the broker closed the connection")


def test_a_denied_subscription_is_one_line(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    result = mqtt(
        "sub", "--broker", f"127.0.0.1:{ports['mtls']}", "--creds", str(fleet.creds("dev-1")),
        "-t", "devices/dev-2/#", "-W", "5",
    )  # fmt: skip
    assert_one_line_error(result, "subscription refused", "devices/dev-2/#")


def test_a_refused_connect_names_the_reason_code(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    # A device token on a broker that revoked the device: CONNACK 5 (not authorized).
    fleet.pki.revoke("dev-1")
    result = mqtt(
        "pub", "--broker", f"127.0.0.1:{ports['jwt']}", "--creds", str(fleet.creds("dev-1")),
        "--auth", "jwt", "-t", "devices/dev-1/x", "-m", "x",
    )  # fmt: skip
    assert_one_line_error(result, "refused by the broker: CONNACK 5 (not authorized)")


def test_a_token_on_the_mtls_listener_never_reaches_mqtt(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    result = mqtt(
        "pub", "--broker", f"127.0.0.1:{ports['mtls']}", "--creds", str(fleet.creds("dev-1")),
        "--auth", "jwt", "-t", "devices/dev-1/x", "-m", "x",
    )  # fmt: skip
    assert_one_line_error(result, f"127.0.0.1:{ports['mtls']}")


def test_a_broker_signed_by_another_root_is_refused_by_the_client(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result], foreign_pki: object
) -> None:
    foreign_root = Path(str(getattr(foreign_pki, "path"))) / "root.crt"  # noqa: B009
    result = mqtt(
        "pub", "--broker", f"127.0.0.1:{ports['jwt']}", "--creds", str(fleet.creds("dev-1")),
        "--auth", "jwt", "--cafile", str(foreign_root), "-t", "devices/dev-1/x", "-m", "x",
    )  # fmt: skip
    assert_one_line_error(result, "failed verification")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-t", "a", "-m", "x", "--broker", "127.0.0.1:1"], "--creds DIR"),
        (["-t", "a", "-m", "x", "--auth", "scram", "--user", "s"], "MQTT 5"),
        (["-t", "a", "-m", "x", "--auth", "kerberos"], "unknown --auth"),
        (["-t", "a", "--auth", "password", "--user", "s", "--cafile", "ca"], "-m TEXT or -f"),
        (
            ["-t", "a", "-m", "x", "--auth", "password", "--user", "s", "--secret-env", "NOPE"],
            "NOPE is not set",
        ),
        (["-t", "a", "-m", "x", "--creds", "/nonexistent"], "does not exist"),
        (
            ["-t", "a", "-m", "x", "--auth", "oidc", "--token-file", "t", "--audience", "a"],
            "--audience is the device token's aud (--auth jwt)",
        ),
    ],
)
def test_usage_errors_are_one_line(
    mqtt: Callable[..., Result], args: list[str], words: str
) -> None:
    assert_one_line_error(mqtt("pub", *args, env={"PATH": "/usr/bin:/bin"}), words)


def test_nothing_listens(fleet: Fleet, mqtt: Callable[..., Result]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mqtt(
        "pub", "--broker", f"127.0.0.1:{port}", "--creds", str(fleet.creds("dev-1")),
        "-t", "devices/dev-1/x", "-m", "x",
    )  # fmt: skip
    assert_one_line_error(result, f"cannot connect to 127.0.0.1:{port}")


# -- a service's secret (password) and an identity provider's token (oidc) -----------------------


def test_password_and_oidc_services_end_to_end(
    fleet: Fleet, mqtt: Callable[..., Result], tmp_path: Path
) -> None:
    import os
    import time

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from broker.auth_oidc import OIDCSettings

    secret, _, _ = fleet.pki.set_service_secret("dash")
    fleet.pki.set_service_secret("grafana")
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    now = int(time.time())
    claims = {"iss": "https://idp.test", "aud": "mqtt", "sub": "grafana", "exp": now + 600}
    token_file = tmp_path / "token"
    token_file.write_text(jwt.encode(claims, idp_key, algorithm="RS256", headers={"kid": "k1"}))
    specs = (ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"password", "oidc"})))
    oidc = OIDCSettings("https://idp.test", "mqtt", str(tmp_path / "jwks.json"))
    thread = BrokerThread(
        BrokerSettings(fleet.pki_dir, listeners=specs, oidc=oidc), audit_sink=lambda _: None
    ).start()
    mtls_port, port = thread.broker.ports.values()
    broker, ca = f"127.0.0.1:{port}", str(fleet.pki_dir / "root.crt")
    env = {**os.environ, "DASH_SECRET": secret, "WRONG": secret + "x"}
    try:
        retained = mqtt(
            "pub", "--broker", f"127.0.0.1:{mtls_port}", "--creds", str(fleet.creds("dev-1")),
            "-t", "devices/dev-1/state", "-m", "online", "-q", "1", "-r",
        )  # fmt: skip
        assert retained.returncode == 0, retained.stderr
        received = mqtt(
            "sub", "--broker", broker, "--cafile", ca, "--auth", "oidc", "--user", "grafana",
            "--token-file", str(token_file), "-t", "devices/+/state", "-C", "1", "-W", "20",
            "--json",
        )  # fmt: skip
        assert received.returncode == 0, received.stderr
        assert json.loads(received.stdout.splitlines()[0])["payload"] == "online"
        published = mqtt(
            "pub", "--broker", broker, "--cafile", ca, "--auth", "password", "--user", "dash",
            "--secret-env", "DASH_SECRET", "-t", "devices/dev-1/commands/x", "-m", "go",
            "-q", "1", "--json",
            env=env,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["method"] == "password"
        wrong = mqtt(
            "pub", "--broker", broker, "--cafile", ca, "--auth", "password", "--user", "dash",
            "--secret-env", "WRONG", "-t", "devices/dev-1/commands/x", "-m", "go",
            env=env,
        )  # fmt: skip
        assert_one_line_error(wrong, "CONNACK 4")
        # A device cannot come in with a password, whatever the listener lists.
        device = mqtt(
            "pub", "--broker", broker, "--cafile", ca, "--auth", "password", "--user", "dev-1",
            "--secret-env", "DASH_SECRET", "-t", "devices/dev-1/state", "-m", "x",
            env=env,
        )  # fmt: skip
        assert_one_line_error(device, "CONNACK 4")
        # Outside the service's grants: the broker ends the session (denied_publish).
        denied = mqtt(
            "pub", "--broker", broker, "--cafile", ca, "--auth", "oidc", "--user", "grafana",
            "--token-file", str(token_file), "-t", "devices/dev-1/state", "-m", "x", "-q", "1",
        )  # fmt: skip
        assert_one_line_error(denied, "the broker closed the connection")
    finally:
        thread.stop()


def test_mqtt5_refusals_are_one_line_with_their_reason_code(
    fleet: Fleet, ports: dict[str, int], mqtt: Callable[..., Result]
) -> None:
    """With -V 5 the broker answers a denied QoS 1 publish with PUBACK 0x87 and keeps the
    connection: the command must not report it as published (twin: an allowed one exits 0)."""
    where = f"127.0.0.1:{ports['mtls']}"
    creds = str(fleet.creds("dev-1"))
    result = mqtt(
        "pub", "-V", "5", "--broker", where, "--creds", creds,
        "-t", "devices/dev-2/commands/x", "-m", "no", "-q", "1",
    )  # fmt: skip
    assert_one_line_error(result, "refused by the broker: 0x87 not authorized")
    ok = mqtt(
        "pub", "-V", "5", "--broker", where, "--creds", creds,
        "-t", "devices/dev-1/telemetry/x", "-m", "yes", "-q", "1",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    sub = mqtt(
        "sub", "-V", "5", "--broker", where, "--creds", creds, "-t", "devices/dev-2/#", "-W", "5",
    )  # fmt: skip
    assert_one_line_error(sub, "subscription refused by the broker (0x87 not authorized)")


def test_scram_service_publishes_and_subscribes_with_the_cli(
    fleet: Fleet, mqtt: Callable[..., Result]
) -> None:
    """--auth scram -V 5: SCRAM over MQTT 5 enhanced authentication (iotauth.scram_client),
    sub --json and pub QoS 1; twins: a wrong secret, -V 311, QoS 2, a publish outside grants."""
    import os

    secret, _, _ = fleet.pki.set_service_secret("dash")
    specs = (ListenerSpec(0, frozenset({"mtls"})), ListenerSpec(0, frozenset({"scram"})))
    thread = BrokerThread(
        BrokerSettings(fleet.pki_dir, listeners=specs), audit_sink=lambda _: None
    ).start()
    mtls_port, port = thread.broker.ports.values()
    broker, ca = f"127.0.0.1:{port}", str(fleet.pki_dir / "root.crt")
    env = {**os.environ, "DASH_SECRET": secret, "WRONG": secret + "x"}
    scram = ("--broker", broker, "--cafile", ca, "--auth", "scram", "--user", "dash")
    try:
        retained = mqtt(
            "pub", "--broker", f"127.0.0.1:{mtls_port}", "--creds", str(fleet.creds("dev-1")),
            "-t", "devices/dev-1/telemetry/t", "-m", "21", "-q", "1", "-r",
        )  # fmt: skip
        assert retained.returncode == 0, retained.stderr
        received = mqtt(
            "sub", *scram, "--secret-env", "DASH_SECRET", "-V", "5",
            "-t", "devices/+/telemetry/#", "-q", "1", "-C", "1", "-W", "20", "--json",
            env=env,
        )  # fmt: skip
        assert received.returncode == 0, received.stderr
        doc = json.loads(received.stdout.splitlines()[0])
        assert (doc["topic"], doc["payload"], doc["retain"]) == (
            "devices/dev-1/telemetry/t",
            "21",
            True,
        )
        for qos in ("0", "1"):
            published = mqtt(
                "pub", *scram, "--secret-env", "DASH_SECRET", "-V", "5",
                "-t", "devices/dev-1/commands/x", "-m", "go", "-q", qos, "--json",
                env=env,
            )  # fmt: skip
            assert published.returncode == 0, published.stderr
            assert json.loads(published.stdout)["method"] == "scram"
        wrong = mqtt(
            "pub", *scram, "--secret-env", "WRONG", "-V", "5", "-t", "devices/dev-1/commands/x",
            "-m", "go", env=env,
        )  # fmt: skip
        assert_one_line_error(wrong, "0x87 not authorized (scram-failed)")
        old = mqtt(
            "pub", *scram, "--secret-env", "DASH_SECRET", "-V", "311",
            "-t", "devices/dev-1/commands/x", "-m", "go", env=env,
        )  # fmt: skip
        assert_one_line_error(old, "--auth scram needs -V 5")
        qos2 = mqtt(
            "pub", *scram, "--secret-env", "DASH_SECRET", "-V", "5",
            "-t", "devices/dev-1/commands/x", "-m", "go", "-q", "2", env=env,
        )  # fmt: skip
        assert_one_line_error(qos2, "QoS 0 and 1")
        denied = mqtt(
            "pub", *scram, "--secret-env", "DASH_SECRET", "-V", "5",
            "-t", "devices/dev-1/telemetry/t", "-m", "forged", "-q", "1", env=env,
        )  # fmt: skip
        assert_one_line_error(denied, "refused by the broker: 0x87 not authorized")
        refused_sub = mqtt(
            "sub", *scram, "--secret-env", "DASH_SECRET", "-V", "5", "-t", "#", "-W", "5",
            env=env,
        )  # fmt: skip
        assert_one_line_error(refused_sub, "subscription refused by the broker (0x87")
    finally:
        thread.stop()


def test_jwt_audience_matches_a_broker_run_with_token_audience(
    fleet: Fleet, mqtt: Callable[..., Result]
) -> None:
    """A broker run with ``--token-audience`` takes device tokens signed for that audience:
    ``mqtt pub|sub --auth jwt --audience AUD`` signs for it; the twin, the default audience (the
    trust domain), is refused with the broker's reason code."""
    specs = (ListenerSpec(0, frozenset({"jwt"})),)
    thread = BrokerThread(
        BrokerSettings(fleet.pki_dir, listeners=specs, token_audience="mqtt.fleet.example"),
        audit_sink=lambda _: None,
    ).start()
    try:
        where = f"127.0.0.1:{next(iter(thread.broker.ports.values()))}"
        dev = str(fleet.creds("dev-1"))
        base = ("--broker", where, "--creds", dev, "--auth", "jwt", "--json")
        published = mqtt(
            "pub", *base, "--audience", "mqtt.fleet.example",
            "-t", "devices/dev-1/state", "-m", "online", "-q", "1", "-r",
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["method"] == "jwt"
        received = mqtt(
            "sub", *base, "--audience", "mqtt.fleet.example",
            "-t", "devices/dev-1/state", "-C", "1", "-W", "20",
        )  # fmt: skip
        assert received.returncode == 0, received.stderr
        assert json.loads(received.stdout.splitlines()[0])["payload"] == "online"
        default = mqtt("pub", *base, "-t", "devices/dev-1/state", "-m", "x")
        assert_one_line_error(default, "refused by the broker: CONNACK 4")
        other = mqtt("sub", *base, "--audience", "another-api", "-t", "devices/dev-1/#", "-W", "5")
        assert_one_line_error(other, "refused by the broker: CONNACK 4")
    finally:
        thread.stop()
