"""What the MQTT codec costs per packet, MQTT 3.1.1 next to MQTT 5.0, in one process.

    .venv/bin/python bench/mqtt_codec.py [--rounds 100] [--number 2000] [--baseline REV]

``broker.mqtt`` is sans-IO, so each hot-path operation is timed on its own with ``timeit``: a
reader that has seen a CONNECT of the level decodes a PUBLISH (64 B payload, QoS 0 and 1) or a
PUBACK, and the encoders build them. Rounds are interleaved across all rows and the minimum is
kept, so a busy machine slows every row alike instead of one. The MQTT 5 rows are the ones the
broker would run for a level-5 client: no properties (the common case), a Topic Alias with an
empty topic name, and two User Properties with a Content Type.

``--baseline REV`` also times the 3.1.1 rows with ``broker/mqtt.py`` as it was at git revision
REV (read with ``git show``), as a before/after of a change to the codec.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker import mqtt  # noqa: E402

TOPIC = b"devices/dev-0001/telemetry"
PAYLOAD = b"x" * 64


def _connect(level: int) -> bytes:
    props = b"\x00" if level == 5 else b""
    body = b"\x00\x04MQTT" + bytes((level, 2, 0, 60)) + props + b"\x00\x01c"
    return bytes((0x10, len(body))) + body


def _reader(module: ModuleType, level: int) -> object:
    reader = module.PacketReader(1 << 20)
    reader.feed(_connect(level))
    return reader


def _rows(module: ModuleType, tag: str) -> dict[str, Callable[[], object]]:
    """The 3.1.1 rows of ``module`` (the current codec or a baseline)."""
    r4 = _reader(module, 4)
    pub0 = module.encode_publish(TOPIC, PAYLOAD, 0, False)
    pub1 = module.encode_publish(TOPIC, PAYLOAD, 1, False, 7)
    ack = module.puback(7)
    return {
        f"decode PUBLISH QoS 0 | 3.1.1{tag}": lambda: r4.feed(pub0),  # type: ignore[attr-defined]
        f"decode PUBLISH QoS 1 | 3.1.1{tag}": lambda: r4.feed(pub1),  # type: ignore[attr-defined]
        f"decode PUBACK | 3.1.1{tag}": lambda: r4.feed(ack),  # type: ignore[attr-defined]
        f"encode PUBLISH QoS 0 | 3.1.1{tag}": lambda: module.encode_publish(
            TOPIC, PAYLOAD, 0, False
        ),
        f"encode PUBLISH QoS 1 | 3.1.1{tag}": lambda: module.encode_publish(
            TOPIC, PAYLOAD, 1, False, 9
        ),
        f"encode PUBACK | 3.1.1{tag}": lambda: module.puback(9),
    }


def _rows5() -> dict[str, Callable[[], object]]:
    r5 = _reader(mqtt, 5)
    alias = mqtt.Properties(topic_alias=1)
    tagged = mqtt.Properties(
        content_type="application/json", user_properties=(("a", "1"), ("b", "2"))
    )
    plain = mqtt.encode_publish5(TOPIC, PAYLOAD, 0, False)
    aliased = mqtt.encode_publish5(
        b"", PAYLOAD, 0, False, 0, False, mqtt.encode_properties(alias, 3)
    )
    with_props = mqtt.encode_publish5(
        TOPIC, PAYLOAD, 0, False, 0, False, mqtt.encode_properties(tagged, 3)
    )
    qos1 = mqtt.encode_publish5(TOPIC, PAYLOAD, 1, False, 7)
    ack = mqtt.ack5(mqtt.PUBACK, 7)
    alias_wire = mqtt.encode_properties(alias, mqtt.PUBLISH)
    return {
        "decode PUBLISH QoS 0 | 5.0": lambda: r5.feed(plain),  # type: ignore[attr-defined]
        "decode PUBLISH QoS 0 | 5.0, Topic Alias": lambda: r5.feed(aliased),  # type: ignore[attr-defined]
        "decode PUBLISH QoS 0 | 5.0, 2 User Properties + Content Type": lambda: r5.feed(  # type: ignore[attr-defined]
            with_props
        ),
        "decode PUBLISH QoS 1 | 5.0": lambda: r5.feed(qos1),  # type: ignore[attr-defined]
        "decode PUBACK | 5.0": lambda: r5.feed(ack),  # type: ignore[attr-defined]
        "encode PUBLISH QoS 0 | 5.0": lambda: mqtt.encode_publish5(TOPIC, PAYLOAD, 0, False),
        "encode PUBLISH QoS 0 | 5.0, Topic Alias": lambda: mqtt.encode_publish5(
            b"", PAYLOAD, 0, False, 0, False, alias_wire
        ),
        "encode PUBLISH QoS 1 | 5.0": lambda: mqtt.encode_publish5(TOPIC, PAYLOAD, 1, False, 9),
        "encode PUBACK | 5.0": lambda: mqtt.ack5(mqtt.PUBACK, 9),
    }


def _baseline(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:broker/mqtt.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "mqtt_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mqtt_baseline", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--number", type=int, default=2000, help="calls per timing")
    parser.add_argument("--baseline", metavar="REV", help="also time the 3.1.1 rows at REV")
    args = parser.parse_args()
    rows = _rows(mqtt, "")
    if args.baseline:
        rows.update(_rows(_baseline(args.baseline), f" at {args.baseline}"))
    rows.update(_rows5())
    best = dict.fromkeys(rows, float("inf"))
    for done in range(args.rounds):
        for name, call in rows.items():
            best[name] = min(best[name], timeit.timeit(call, number=args.number) / args.number)
        print(f"round {done + 1}/{args.rounds}", file=sys.stderr)
    by_op: dict[str, dict[str, float]] = {}
    for name, seconds in best.items():
        op, variant = name.split(" | ")
        by_op.setdefault(op, {})[variant] = seconds * 1e9
    print("| operation | variant | ns per packet | vs 3.1.1 |")
    print("|---|---|---:|---:|")
    for op, variants in by_op.items():
        reference = variants["3.1.1"]
        for variant, ns in variants.items():
            print(f"| {op} | {variant} | {ns:.0f} | {100 * (ns - reference) / reference:+.1f} % |")
    print(
        f"\nMinimum of {args.rounds} interleaved rounds of {args.number} calls each "
        f"(Python {sys.version.split()[0]})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
