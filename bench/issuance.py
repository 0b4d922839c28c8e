"""Devices issued per second, end to end, next to the raw cryptographic cost in the same run.

    .venv/bin/python bench/issuance.py [--devices 2000] [--pin] [--dir DIR] [--no-token]
    .venv/bin/python bench/issuance.py --factory [--devices 2000]   # SQLite next to PostgreSQL

Measures, on one core if --pin is given:
  raw        P-256 key generation + building and signing a leaf certificate (no disk): the floor
  single     PKI.issue() per device: key, cert, registry row, signed ledger line, each durable
             (one SQLite transaction and two fsyncs per device), no credential directory
  single+out the same plus the credential directory (5 files, fsync each, rename)
  batch      PKI.issue_many() in batches of 500: one transaction and one ledger fsync per batch
Each figure is the median of --reps runs. The PKI lives under --dir (default: a temporary
directory beside this file, so the disk is the project's disk, not a tmpfs).

Then, in the same run, the issuing CA key in a PKCS#11 token against the key file: a second PKI
whose issuing key is in a SoftHSM2 token made for the run (skipped with a note if softhsm2 is not
installed, or with --no-token): one signature, build & sign a leaf, batch and single issuance.

--factory compares the two registries in one run (bench/factory.py): batch issuance from one
station and from 4 stations at once (separate processes), and revocation-to-kick latency across
two brokers, on SQLite (one PKI directory, crl.pem) and on a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from provisioning.certificates import build_leaf, generate_key
from provisioning.identity import Identity
from provisioning.pki import PKI

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_raw(pki: PKI, count: int) -> tuple[float, float, float]:
    """Returns (keygen µs, sign µs, devices/s for both) with no disk involved."""
    issuer_key = pki.issuing_key()
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(count)]
    t1 = time.perf_counter()
    for n, key in enumerate(keys):
        build_leaf(
            Identity.device(f"raw-{n}", pki.trust_domain),
            key.public_key(),
            issuer=pki.issuing,
            issuer_key=issuer_key,
            now=now,
            days=90,
        )
    t2 = time.perf_counter()
    keygen_us = (t1 - t0) / count * 1e6
    sign_us = (t2 - t1) / count * 1e6
    return keygen_us, sign_us, _rate(count, t2 - t0)


def bench_single(pki: PKI, count: int, prefix: str, out_root: Path | None) -> float:
    t0 = time.perf_counter()
    for n in range(count):
        pki.issue(f"{prefix}-{n}", out=out_root / f"{prefix}-{n}" if out_root else None)
    return _rate(count, time.perf_counter() - t0)


def bench_batch(pki: PKI, count: int, prefix: str, batch: int = 500) -> float:
    t0 = time.perf_counter()
    for start in range(0, count, batch):
        pki.issue_many([f"{prefix}-{n}" for n in range(start, min(count, start + batch))])
    return _rate(count, time.perf_counter() - t0)


def bench_fsync(directory: Path, count: int = 200) -> float:
    """µs per append+fsync of a 700-byte line: the disk's floor for one durable write."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            os.write(fd, b"x" * 700)
            os.fsync(fd)
        return (time.perf_counter() - t0) / count * 1e6
    finally:
        os.close(fd)
        path.unlink()


def median_of(reps: int, fn: Callable[[int], float]) -> float:
    return statistics.median(fn(r) for r in range(reps))


def _shown(path: Path) -> str:
    """``bench/results`` rather than this machine's absolute path (the report is committed)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return f"{path.name}/ (outside the repository)"


def bench_sign(pki: PKI, count: int) -> tuple[float, float]:
    """(µs per bare signature, µs per leaf built and signed) with the PKI's issuing key."""
    signer = pki.issuing_key()
    public_key = generate_key().public_key()
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    for n in range(count):
        signer.sign(n.to_bytes(32, "big"))
    t1 = time.perf_counter()
    for n in range(count):
        build_leaf(
            Identity.device(f"sig-{n}", pki.trust_domain),
            public_key,
            issuer=pki.issuing,
            issuer_key=signer,
            now=now,
            days=90,
        )
    t2 = time.perf_counter()
    return (t1 - t0) / count * 1e6, (t2 - t1) / count * 1e6


def token_pki(work: Path) -> tuple[PKI, str] | None:
    """A PKI whose issuing key is made in a fresh SoftHSM2 token under ``work``."""
    util = shutil.which("softhsm2-util")
    module = next((m for m in SOFTHSM_MODULES if Path(m).exists()), None)
    if util is None or module is None:
        return None
    tokens = work / "softhsm-tokens"
    tokens.mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    pin = "bench-pin"
    os.environ.update(SOFTHSM2_CONF=str(conf), IOTAUTH_PKCS11_PIN=pin, IOTAUTH_PKCS11_MODULE=module)
    init = [util, "--init-token", "--free", "--label", "bench", "--pin", pin, "--so-pin", pin]
    subprocess.run(init, check=True, capture_output=True)
    version = subprocess.run([util, "--version"], capture_output=True, text=True, check=False)
    pki = PKI.init(
        work / "pki-token",
        trust_domain="bench.example",
        issuing_key="pkcs11:token=bench;object=issuing",
    )
    return pki, f"SoftHSM2 {version.stdout.strip()} ({module})"


def compare_token(work: Path, file_pki: PKI, n: int, reps: int, file_rates: list[float]) -> str:
    """The token table, as Markdown: the same measurements with the issuing key in a token."""
    made = token_pki(work)
    if made is None:
        return "Token comparison skipped: softhsm2 is not installed (apt-get install softhsm2).\n"
    pki, what = made
    try:
        file_sig, file_leaf = _median_pair([bench_sign(file_pki, n) for _ in range(reps)])
        tok_sig, tok_leaf = _median_pair([bench_sign(pki, n) for _ in range(reps)])
        tok_batch = median_of(reps, lambda r: bench_batch(pki, n, f"tb{r}"))
        tok_single = median_of(reps, lambda r: bench_single(pki, n // 4, f"ts{r}", None))
        pki.verify_ledger()
    finally:
        pki.close()
    file_batch, file_single = file_rates
    rows = [
        (
            "one ECDSA P-256 signature",
            f"{file_sig:.0f} µs",
            f"{tok_sig:.0f} µs",
            tok_sig / file_sig,
        ),
        (
            "build & sign a leaf, no disk",
            f"{file_leaf:.0f} µs",
            f"{tok_leaf:.0f} µs",
            tok_leaf / file_leaf,
        ),
        (
            "batch `issue_many`, devices/s",
            f"{file_batch:,.0f}",
            f"{tok_batch:,.0f}",
            tok_batch / file_batch,
        ),
        (
            "single `issue`, devices/s",
            f"{file_single:,.0f}",
            f"{tok_single:,.0f}",
            tok_single / file_single,
        ),
    ]
    lines = [
        f"Issuing CA key in a file and in a PKCS#11 token, same run: {what}",
        "",
        "| what | key file | token | token / file |",
        "|---|---:|---:|---:|",
        *(f"| {w} | {f} | {t} | {ratio:.2f}x |" for w, f, t, ratio in rows),
    ]
    return "\n".join(lines) + "\n"


def _median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=2000, help="devices per measured run")
    parser.add_argument("--reps", type=int, default=3, help="runs per figure (median reported)")
    parser.add_argument("--pin", action="store_true", help="pin to CPU 0 (one core)")
    parser.add_argument("--dir", type=Path, default=None, help="where to create the PKI")
    parser.add_argument(
        "--no-token", action="store_true", help="skip the PKCS#11 (SoftHSM2) comparison"
    )
    parser.add_argument(
        "--factory", action="store_true", help="SQLite next to PostgreSQL (bench/factory.py)"
    )
    parser.add_argument("--kicks", type=int, default=40, help="--factory: revocations timed")
    args = parser.parse_args()
    if args.devices <= 0 or args.reps <= 0:
        parser.error("--devices and --reps must be positive")
    return args


def main() -> int:
    args = _parse_args()
    if args.factory:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from factory import run_factory

        return run_factory(devices=args.devices, reps=args.reps, kicks=args.kicks, base=args.dir)
    if args.pin:
        os.sched_setaffinity(0, {0})

    base = args.dir or Path(__file__).resolve().parent / "results"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="issuance-", dir=base))
    try:
        pki = PKI.init(work / "pki", trust_domain="bench.example")
        generate_key()  # warm up OpenSSL
        n = args.devices
        raws = [bench_raw(pki, n) for _ in range(args.reps)]
        keygen_us = statistics.median(r[0] for r in raws)
        sign_us = statistics.median(r[1] for r in raws)
        raw_rate = statistics.median(r[2] for r in raws)
        fsync_us = statistics.median(bench_fsync(work) for _ in range(args.reps))
        single = median_of(args.reps, lambda r: bench_single(pki, n, f"s{r}", None))
        out_n = max(1, n // 4)
        single_out = median_of(
            args.reps, lambda r: bench_single(pki, out_n, f"o{r}", work / f"creds{r}")
        )
        batch = median_of(args.reps, lambda r: bench_batch(pki, n, f"b{r}"))
        rows = pki.registry.count()
        pki.verify_ledger()  # the benchmark's output is a valid ledger, not just a fast one
        token_report = (
            compare_token(work, pki, n, args.reps, [batch, single])
            if not args.no_token
            else "Token comparison skipped (--no-token).\n"
        )
        pki.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"Issuance benchmark: {n} devices per run, median of {args.reps}, "
        f"{'pinned to CPU 0' if args.pin else 'unpinned'}"
    )
    print(
        f"Python {platform.python_version()}, {platform.machine()}, "
        f"cryptography {__import__('cryptography').__version__}, disk under {_shown(base)}"
    )
    print()
    print("| what | devices/s | per device |")
    print("|---|---:|---:|")
    print(
        f"| raw: P-256 keygen ({keygen_us:.0f} µs) + build & sign leaf ({sign_us:.0f} µs), no disk "
        f"| {raw_rate:,.0f} | {1e6 / raw_rate:.0f} µs |"
    )
    print(
        f"| disk floor: append 700 B + fsync ({fsync_us:.0f} µs), no crypto "
        f"| {1e6 / fsync_us:,.0f} | {fsync_us:.0f} µs |"
    )
    print(f"| batch: `issue_many`, 500 per transaction | {batch:,.0f} | {1e6 / batch:.0f} µs |")
    print(f"| single: `issue`, durable per device | {single:,.0f} | {1e6 / single:.0f} µs |")
    print(f"| single + credential directory | {single_out:,.0f} | {1e6 / single_out:.0f} µs |")
    print()
    print(f"{rows} certificates issued in all; ledger verified.")
    print()
    print(token_report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
