"""Provisioning time per device over a 115200-baud link, next to the wire time of its bytes.

    .venv/bin/python bench/provision.py [--devices 8] [--baud 115200] [--link socket|pty]

For each key mode (on-device key generation with a CSR; a key injected by the station) it
provisions --devices virtual devices one after another. Each device paces its bytes like a UART
at --baud (8N1, 10 bits a byte), counts what crossed the link, and so gives the wire-time floor
for exactly the bytes exchanged; the table shows the measured time next to it. Then gang mode:
1, 4 and 8 devices at once through provision_many, as devices per second.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hardware import VirtualDevice
from provisioning.pki import PKI
from provisioning.station import StationSettings, provision, provision_many

SETTINGS = StationSettings(timeout=0.5, retries=6)


def one_mode(pki: PKI, work: Path, mode: str, count: int, baud: int, link: str) -> dict[str, float]:
    times, wires, sizes = [], [], []
    for n in range(count):
        store = work / f"{mode}-{n}"
        with VirtualDevice(store, link, baudrate=baud, can_genkey=mode == "device") as device:
            t0 = time.perf_counter()
            result = provision(pki, device.address, keygen=mode, settings=SETTINGS)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
            wires.append(device.wire_seconds)
            sizes.append(device.bytes_in + device.bytes_out)
        if not result.ok:
            raise SystemExit(f"{mode} device {n} failed: {result.reason}")
    t, w = statistics.median(times), statistics.median(wires)
    return {"seconds": t, "wire": w, "ratio": t / w, "bytes": statistics.median(sizes)}


def gang(pki_dir: Path, work: Path, width: int, baud: int, link: str, rounds: int) -> float:
    done, elapsed = 0, 0.0
    for r in range(rounds):
        devices = [
            VirtualDevice(work / f"gang{width}-{r}-{n}", link, baudrate=baud).start()
            for n in range(width)
        ]
        try:
            t0 = time.perf_counter()
            results = provision_many(pki_dir, [d.address for d in devices], settings=SETTINGS)
            elapsed += time.perf_counter() - t0
        finally:
            for d in devices:
                d.stop()
        failed = [r for r in results if not r.ok]
        if failed:
            raise SystemExit(f"gang {width}: {failed[0].port}: {failed[0].reason}")
        done += width
    return done / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=8, help="devices per key mode")
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--link", choices=("socket", "pty"), default="pty")
    parser.add_argument("--rounds", type=int, default=2, help="gang rounds per width")
    args = parser.parse_args()
    link = "pty" if args.link == "pty" else "socket://127.0.0.1:0"
    work = Path(tempfile.mkdtemp(prefix="provision-", dir=Path(__file__).resolve().parent))
    try:
        pki_dir = work / "pki"
        with PKI.init(pki_dir, trust_domain="bench.example") as pki:
            modes = {
                m: one_mode(pki, work, m, args.devices, args.baud, link)
                for m in ("device", "station")
            }
        rates = {w: gang(pki_dir, work, w, args.baud, link, args.rounds) for w in (1, 4, 8)}
        with PKI.open(pki_dir) as pki:
            pki.verify_ledger()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"Provisioning over a {args.baud}-baud {args.link} link, "
        f"median of {args.devices} devices per mode"
    )
    print()
    print("| key mode | bytes exchanged | wire time | measured | measured / wire |")
    print("|---|---:|---:|---:|---:|")
    for mode, label in (("device", "on-device key + CSR"), ("station", "injected key")):
        m = modes[mode]
        print(
            f"| {label} | {m['bytes']:,.0f} B | {m['wire'] * 1000:.0f} ms "
            f"| {m['seconds'] * 1000:.0f} ms | {m['ratio']:.2f}x |"
        )
    print()
    print("| gang width | devices/s | vs one port |")
    print("|---:|---:|---:|")
    for width, rate in rates.items():
        print(f"| {width} | {rate:.2f} | {rate / rates[1]:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
