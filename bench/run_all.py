"""Run every benchmark and write docs/BENCHMARKS.md: `make bench`.

Each benchmark prints Markdown; this script records the machine, the versions, the date and
the exact command next to each output, and appends the notes in bench/notes/<name>.md that say
how to read it. A benchmark that fails is reported as failed in the document (and makes this
script exit non-zero) instead of silently keeping old figures.

``--only NAME`` (repeatable) re-runs those benchmarks and replaces only their sections of the
existing document; the header then lists which sections were refreshed when.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# (name, title, command); a benchmark whose script does not exist yet is listed as missing.
BENCHES: list[tuple[str, str, list[str]]] = [
    ("issuance", "Issuance", [PY, "bench/issuance.py", "--pin", "--devices", "2000"]),
    (
        "factory",
        "Factory: SQLite next to PostgreSQL (stations at once, revocation to every broker)",
        [PY, "bench/issuance.py", "--factory", "--devices", "2000", "--kicks", "100"],
    ),
    ("provision", "Serial provisioning", [PY, "bench/provision.py"]),
    (
        "broker",
        "Broker: our broker next to plain amqtt and Mosquitto",
        [PY, "bench/broker_bench.py"],
    ),
    ("broker_acl", "Broker: the ACL's share of the publish path", [PY, "bench/broker_acl.py"]),
    ("mqtt_codec", "Broker: the MQTT codec, 3.1.1 next to 5.0", [PY, "bench/mqtt_codec.py"]),
    (
        "auth_connect",
        "Broker: CPU per connect for each authentication method",
        [PY, "bench/auth_connect.py"],
    ),
    (
        "broker_10k",
        "Broker: 10,000 connected devices",
        [
            PY,
            "bench/broker_bench.py",
            "--rounds",
            "1",
            "--phases",
            "idle",
            "--idle-clients",
            "10000",
        ],
    ),
    (
        "broker_persist",
        "Broker: what persistence costs, next to Mosquitto's",
        [PY, "bench/broker_persist.py", "--rounds", "5"],
    ),
    ("agent_footprint", "Device agent footprint", [PY, "bench/agent_footprint.py"]),
    (
        "agent_footprint_tpm",
        "Device agent footprint with its key in a TPM",
        [PY, "bench/agent_footprint.py", "--keystore", "tpm"],
    ),
    (
        "agent_footprint_jwt",
        "Device agent footprint with device tokens (--auth jwt)",
        [PY, "bench/agent_footprint.py", "--auth", "jwt"],
    ),
    (
        "tpm_handshake",
        "Device agent: TLS handshake with a file key and with a TPM key",
        [PY, "bench/tpm_handshake.py"],
    ),
    (
        "fleet",
        "Fleet simulation",
        [PY, "bench/fleet.py", "--devices", "1000", "2000", "--duration", "40"],
    ),
]


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _tool(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return [
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB, "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"- Python {platform.python_version()}; cryptography {_version('cryptography')}, "
        f"amqtt {_version('amqtt')}, paho-mqtt {_version('paho-mqtt')}, "
        f"pyserial {_version('pyserial')}",
        f"- {_tool(['openssl', 'version'])}; mosquitto: {_tool(['/usr/sbin/mosquitto', '-h'])}",
    ]


def _merge(old: str, fresh: dict[str, list[str]], now: str) -> str:
    """``old`` with the sections titled in ``fresh`` replaced (in place), the rest kept."""
    head, *parts = old.split("\n## ")
    kept = {part.split("\n", 1)[0]: part for part in parts}
    for title, lines in fresh.items():
        kept[title] = "\n".join(lines).removeprefix("## ")
    note = f"Sections re-run on {now} with `--only`: {', '.join(fresh)}."
    head_lines = head.rstrip().split("\n")
    order = [title for _, title, _ in BENCHES]
    titles = sorted(kept, key=lambda t: order.index(t) if t in order else len(order))
    return (
        "\n".join([*head_lines, "", note])
        + "\n"
        + "".join("\n## " + kept[t].rstrip() + "\n" for t in titles)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--only", action="append", help="run only these benchmarks (by name)")
    args = parser.parse_args()
    known = [name for name, _, _ in BENCHES]
    unknown = [name for name in args.only or () if name not in known]
    if unknown:
        # before anything runs or is written: a typo must not record an empty re-run
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(known)}")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python bench/run_all.py`) on {now}. Every figure below comes",
        "from the command shown, run in that session on this machine; tests never assert times.",
        "",
        *machine(),
        "",
    ]
    failed = 0
    sections: dict[str, list[str]] = {}
    for name, title, command in BENCHES:
        if args.only and name not in args.only:
            continue
        doc = sections[title] = []
        doc += [
            f"## {title}",
            "",
            f"Command: `{shlex.join(['.venv/bin/python', *command[1:]])}`",
            "",
        ]
        if not (ROOT / command[1]).exists():
            doc += ["Not measured: the script does not exist yet.", ""]
            continue
        print(f"running {name}: {shlex.join(command[1:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800
        )
        took = time.monotonic() - t0
        if proc.returncode != 0:
            failed += 1
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            doc += [
                f"**Failed** (exit {proc.returncode} after {took:.0f} s):",
                "",
                "```",
                *tail,
                "```",
                "",
            ]
            continue
        output = proc.stdout.strip()
        if output.startswith("Command:"):  # a benchmark that prints its own command line
            output = output.split("\n", 1)[-1].lstrip()
        doc += [output, "", f"({took:.0f} s)", ""]
        notes = ROOT / "bench" / "notes" / f"{name}.md"
        if notes.exists():
            doc += [notes.read_text().strip(), ""]
    if args.only and args.out.exists():
        text = _merge(args.out.read_text(), sections, now)
    else:
        text = "\n".join(header + [line for lines in sections.values() for line in lines])
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
