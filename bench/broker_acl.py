"""What the ACL decision costs on the broker's publish path, measured on the core itself.

    .venv/bin/python bench/broker_acl.py [--messages 200000] [--rounds 5]

``broker.core`` is sans-IO, so it can be driven without sockets or TLS: 20 device sessions
publish QoS 0 telemetry (100 B) to ``devices/<id>/telemetry/t`` and one service session holds
``devices/+/telemetry/#``, on links that only count bytes. Per delivered message, three variants,
in the same process and rounds interleaved:

  shipped     the default policy, decisions cached per session and topic (what the broker runs)
  uncached    the same policy, every PUBLISH and RECEIVE decided from the grants again
  allow-all   uncached, with grants that allow everything: the lookup machinery alone

In the shipped steady state the ACL is two dictionary lookups per message (the publisher's
PUBLISH decision and the receiver's RECEIVE decision, both cache hits); their cost is timed on
their own with ``timeit`` and given as a share of the shipped path. The issue's target is
<= 5 % of throughput. The core's path is a part of what a message costs the broker (TLS, framing and
syscalls come on top; see bench/broker_bench.py), so the share of the whole is smaller still.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import mqtt
from broker.audit import AuditLog
from broker.auth import Authenticated
from broker.core import BrokerCore, Session
from broker.metrics import Metrics
from broker.policy import Action
from broker.settings import BrokerSettings
from provisioning.identity import Identity

DOMAIN = "bench.example"
PUBLISHERS = 20


class CountingLink:
    peer = "127.0.0.1:0"
    tls_version: str | None = "TLSv1.3"

    def __init__(self) -> None:
        self.bytes = 0
        self.holds: set[Session] = set()

    def send(self, data: bytes) -> None:
        self.bytes += len(data)

    def backlog(self) -> int:
        return 0

    def hold(self, receiver: Session) -> None:
        self.holds.add(receiver)

    def release(self, receiver: Session) -> None:
        self.holds.discard(receiver)

    def close(self, *, will: bool, reason: str | None = None) -> None:
        pass


class NeverCached(dict[str, bool]):
    """A decision cache that never remembers: every lookup misses."""

    def get(self, key: str, default: bool | None = None) -> bool | None:  # type: ignore[override]
        return None

    def __setitem__(self, key: str, value: bool) -> None:
        pass


class AllowAll:
    def allows(self, action: Action, topic: str) -> bool:
        return True


def _attach(core: BrokerCore, identity: Identity) -> Session:
    connect = mqtt.Connect(4, identity.name, True, 60)
    auth = Authenticated(identity, "mtls", "1")
    session, _ = core.attach(CountingLink(), connect, auth)
    return session


def build(variant: str) -> tuple[BrokerCore, list[Session], CountingLink]:
    core = BrokerCore(
        BrokerSettings(Path("/nonexistent")), audit=AuditLog(lambda _: None), metrics=Metrics()
    )
    devices = [_attach(core, Identity.device(f"dev-{n:03d}", DOMAIN)) for n in range(PUBLISHERS)]
    sink = _attach(core, Identity.service("sink", DOMAIN))
    core.subscribe(sink, mqtt.Subscribe(1, [("devices/+/telemetry/#", 0)]))
    for session in [*devices, sink]:
        if variant in ("uncached", "allow-all"):
            session.publish_ok = NeverCached()
            session.receive_ok = NeverCached()
        if variant == "allow-all":
            session.grants = AllowAll()  # type: ignore[assignment]
    assert isinstance(sink.link, CountingLink)
    return core, devices, sink.link


def run(variant: str, messages: int) -> float:
    """CPU microseconds per delivered message."""
    core, devices, sink = build(variant)
    payload = b"x" * 100
    packets = [
        mqtt.Publish(f"devices/{s.client_id}/telemetry/t", payload, 0, False, False, 0)
        for s in devices
    ]
    pairs = [(devices[k % PUBLISHERS], packets[k % PUBLISHERS]) for k in range(PUBLISHERS)]
    publish = core.publish
    t0 = time.process_time()
    for _ in range(messages // PUBLISHERS):
        for session, packet in pairs:
            publish(session, packet)
    cpu = time.process_time() - t0
    delivered = core.messages_out
    assert delivered == messages // PUBLISHERS * PUBLISHERS, delivered
    assert sink.bytes > 0
    return cpu / delivered * 1e6


def cached_lookups_us() -> float:
    """Two cache hits, as the shipped path does them for each delivered message."""
    publish_ok = {f"devices/dev-{n:03d}/telemetry/t": True for n in range(PUBLISHERS)}
    receive_ok = dict(publish_ok)
    topic = "devices/dev-007/telemetry/t"

    def two() -> None:
        allowed = publish_ok.get(topic)
        if allowed is None:
            raise AssertionError
        allowed = receive_ok.get(topic)
        if allowed is None:
            raise AssertionError

    number = 1_000_000
    return min(timeit.repeat(two, number=number, repeat=3)) / number * 1e6 - _call_overhead_us()


def _call_overhead_us() -> float:
    def nothing() -> None:
        return None

    number = 1_000_000
    return min(timeit.repeat(nothing, number=number, repeat=3)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = ("shipped", "uncached", "allow-all")
    results: dict[str, list[float]] = {v: [] for v in variants}
    lookups: list[float] = []
    for _ in range(args.rounds):
        for variant in variants:
            results[variant].append(run(variant, args.messages))
        lookups.append(cached_lookups_us())
    med = {v: statistics.median(r) for v, r in results.items()}
    lookup = statistics.median(lookups)
    share = lookup / med["shipped"] * 100
    uncached_share = (med["uncached"] - med["allow-all"]) / med["uncached"] * 100
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = f"bench/broker_acl.py --messages {args.messages} --rounds {args.rounds}"
    print(f"Command: `.venv/bin/python {command}`\n")
    print(
        f"Run on {now}: {args.messages} QoS 0 messages per variant and round, {PUBLISHERS} "
        f"publishers -> 1 wildcard subscriber, median of {args.rounds} rounds (CPU time).\n"
    )
    print("| variant | core CPU per delivered message (us) | rounds |")
    print("|---|---:|---|")
    for variant in variants:
        rounds = ", ".join(f"{x:.2f}" for x in results[variant])
        print(f"| {variant} | {med[variant]:.2f} | {rounds} |")
    print(
        f"\nThe two cached decisions per message (timeit): {lookup * 1000:.0f} ns, "
        f"**{share:.1f} %** of the shipped path (target <= 5 %). Evaluating the policy for "
        f"every message instead would be {uncached_share:.0f} % of the uncached path."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
