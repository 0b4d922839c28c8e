"""How large a fleet of mTLS agents this machine sustains, against our broker and mosquitto.

    .venv/bin/python bench/fleet.py [--devices N ...] [--duration S] [--brokers ours mosquitto]

Each run: a fresh PKI, N devices issued (real keys and certificates), N agents in this process
(4 reactor threads), the broker on 127.0.0.1 as its own process (``ours-process``: `iotauth broker
run`; ``mosquitto``; ``ours``: in this process, sharing the GIL with the agents), steady
telemetry every 10 s, and a broker restart halfway (storm). A size is "sustained" when every
device connected, came back after the restart, and at least 90 % of the telemetry produced was
acknowledged by the broker. Delivery to the monitor is reported, not required: a broker without
persistence loses what it acknowledged while the monitor was not yet resubscribed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent.fleet import FleetSpec, run_fleet
from iotauth.fleet_backend import LocalFleetBackend
from provisioning.pki import PKI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--brokers", nargs="+", default=["ours-process", "mosquitto"])
    parser.add_argument("--interval", type=float, default=10)
    parser.add_argument(
        "--mqtt5-share",
        type=float,
        default=None,
        metavar="F",
        help="fraction of the devices on MQTT 5, the rest on 3.1.1 (default: all auto)",
    )
    args = parser.parse_args()
    for kind in args.brokers:
        for n in args.devices:
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                PKI.init(root / "pki", trust_domain="fleet.example").close()
                backend = LocalFleetBackend(root / "pki", kind=kind, workdir=root, renewal=False)
                try:
                    spec = FleetSpec(
                        devices=n,
                        duration=args.duration,
                        scenarios=("steady", "storm"),
                        telemetry_interval=args.interval,
                        reactors=4,
                        mqtt5_share=args.mqtt5_share,
                    )
                    report = run_fleet(spec, backend, workdir=root / "fleet")
                finally:
                    backend.close()
            acked = report.messages_acked / max(1, report.messages_enqueued)
            ok = (
                report.online_at_end == report.expected_online
                and report.storm_recovery_s is not None
                and acked >= 0.9
            )
            print(f"== {kind}, {n} devices: {'sustained' if ok else 'NOT sustained'}")
            print("\n".join("   " + line for line in report.lines()), flush=True)


if __name__ == "__main__":
    main()
