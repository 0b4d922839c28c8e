"""The agent's slim command line: ``iotauth-agent run`` and ``python -m device_agent run``.

This is what a device runs (packaging/iotauth-agent.service). It uses argparse, not typer and rich,
and imports nothing of ``iotauth``: those cost a device several MB of RSS for a command line that is
read once at boot (bench/notes/agent_footprint.md). ``iotauth agent run`` hands its arguments to
:func:`main` here, so the two spellings share one set of options, one behaviour and one set of exit
codes: 0 after a clean stop (SIGTERM or SIGINT: ``offline`` published, DISCONNECT), 1 with one
``error:`` line on stderr for anything the user can fix, 2 for a usage error (argparse), and, from
:func:`console_main`, 130 when interrupted before the agent runs and 70 with one ``internal error:``
line for a bug (``IOTAUTH_DEBUG=1`` shows the traceback), as ``iotauth.cli.main`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.errors import AgentError
from provisioning.errors import ProvisioningError

__all__ = ["build_parser", "console_main", "describe_user_error", "main", "run_agent"]

log = logging.getLogger("iotauth.agent")


class _OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line, as everywhere in iotauth: what is wrong and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see '{self.prog} --help'\n")


def build_parser(prog: str = "iotauth-agent") -> argparse.ArgumentParser:
    """The options of ``run``: the only definition, used by every entry point."""
    # allow_abbrev=False: a misspelt option is an error, as it is for typer, never a guess.
    parser = _OneLineErrors(
        prog=prog,
        description="The iotauth device agent (MQTT over mutual TLS).",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="Run the agent until SIGTERM or Ctrl-C.",
        description="Run the agent until SIGTERM or Ctrl-C (then publish 'offline' and "
        "disconnect).",
        allow_abbrev=False,
    )
    run.add_argument(
        "--store", type=Path, required=True, metavar="DIR", help="The credential directory."
    )
    run.add_argument(
        "--broker", metavar="HOST:PORT", help="The broker (default: config, identity.json)."
    )
    run.add_argument("--config", type=Path, metavar="FILE", help="agent.toml")
    run.add_argument(
        "--telemetry-interval", type=float, metavar="SECONDS", help="Seconds between samples."
    )
    run.add_argument("-v", "--verbose", action="store_true", help="Log at debug level.")
    return parser


def describe_user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix; None for anything else (a bug)."""
    if isinstance(exc, AgentError | ProvisioningError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None


def run_agent(
    store: Path,
    *,
    broker: str | None = None,
    config: Path | None = None,
    telemetry_interval: float | None = None,
    verbose: bool = False,
) -> int:
    """Run the agent on this thread until SIGTERM or SIGINT; the exit code (0, or 1 + one line)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("paho").setLevel(logging.WARNING)
    try:
        cfg = load_config(config, store=store, broker=broker, telemetry_interval=telemetry_interval)
        agent = Agent(cfg)

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: shutting down", signum)
            agent.stop(agent.reactor.stop)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        agent.run()
        agent.queue.close()
    except (AgentError, ProvisioningError, OSError) as exc:
        print(f"error: {describe_user_error(exc)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "iotauth-agent") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; the exit code."""
    args = build_parser(prog).parse_args(argv)
    # One sub-command today; argparse has already refused anything else.
    return run_agent(
        args.store,
        broker=args.broker,
        config=args.config,
        telemetry_interval=args.telemetry_interval,
        verbose=args.verbose,
    )


def console_main() -> int:
    """The ``iotauth-agent`` script and ``python -m device_agent``: never a traceback for a user."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line for the user
        if os.environ.get("IOTAUTH_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (set IOTAUTH_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 70
