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
from device_agent.config import AUTH_METHODS, MQTT_VERSIONS, load_config
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
        description="The iotauth device agent (MQTT 5 or 3.1.1 over TLS).",
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
    run.add_argument(
        "--mqtt-version",
        choices=MQTT_VERSIONS,
        help="MQTT protocol: 5, 311, or auto (5, and 3.1.1 with a broker that refuses 5; "
        "default: config, else auto).",
    )
    run.add_argument(
        "--session-expiry",
        type=_non_negative_int,
        metavar="SECONDS",
        help="MQTT 5 session expiry interval (default: config, else 3600; 0: none).",
    )
    run.add_argument(
        "--auth",
        choices=AUTH_METHODS,
        help="mtls: present the certificate; jwt: send a device token signed by the device "
        "key as the password over server-authenticated TLS (default: config, else mtls).",
    )
    run.add_argument(
        "--token-ttl",
        type=_positive_int,
        metavar="SECONDS",
        help="Lifetime of each device token with --auth jwt (default: config, else 3600).",
    )
    run.add_argument(
        "--token-audience",
        metavar="AUD",
        help="The aud claim of each device token, as the broker's --token-audience "
        "(default: config, else the trust domain).",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="Log at debug level.")
    return parser


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"{text!r} is not a whole number"
        raise argparse.ArgumentTypeError(msg) from None
    if value < minimum:
        msg = f"{value} is below {minimum}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1)


def _non_negative_int(text: str) -> int:
    return _int(text, 0)


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
    mqtt_version: str | None = None,
    session_expiry: int | None = None,
    auth: str | None = None,
    token_ttl: int | None = None,
    token_audience: str | None = None,
) -> int:
    """Run the agent on this thread until SIGTERM or SIGINT; the exit code (0, or 1 + one line)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("paho").setLevel(logging.WARNING)
    try:
        cfg = load_config(
            config,
            store=store,
            broker=broker,
            telemetry_interval=telemetry_interval,
            mqtt_version=mqtt_version,
            session_expiry=session_expiry,
            auth=auth,
            token_ttl=token_ttl,
            token_audience=token_audience,
        )
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
        mqtt_version=args.mqtt_version,
        session_expiry=args.session_expiry,
        auth=args.auth,
        token_ttl=args.token_ttl,
        token_audience=args.token_audience,
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
