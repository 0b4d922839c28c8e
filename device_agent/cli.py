"""``iotauth agent run`` and ``iotauth fleet simulate`` (typer apps; the root mounts them).

Errors a user can fix end in one ``error:`` line on stderr and exit 1, never a traceback.
``agent run`` hands its arguments to ``device_agent.main``, the slim command line a device runs
(``iotauth-agent run``), so its options are defined once, there.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import typer

from device_agent.errors import AgentError
from device_agent.main import describe_user_error
from device_agent.main import main as agent_main
from provisioning.errors import ProvisioningError

if TYPE_CHECKING:
    from device_agent.fleet import FleetBackend, FleetProgress

__all__ = ["FleetBackendFactory", "agent_app", "fleet_app", "set_fleet_backend", "user_errors"]

agent_app = typer.Typer(
    name="agent", help="The device agent (MQTT over mutual TLS).", no_args_is_help=True
)
fleet_app = typer.Typer(
    name="fleet", help="Simulate a fleet of agents with real certificates.", no_args_is_help=True
)


@agent_app.callback()
def _agent() -> None:
    """The device agent (MQTT over mutual TLS)."""


@fleet_app.callback()
def _fleet() -> None:
    """Simulate a fleet of agents with real certificates."""


class FleetBackendFactory(Protocol):
    """Set by the composition root: builds the simulator's PKI + broker (it must have close())."""

    def __call__(
        self,
        pki: Path | None,
        broker: str | None,
        workdir: Path,
        *,
        into_pki: bool,
        names: Sequence[str],
        warn: Callable[[str], None],
    ) -> FleetBackend: ...


_fleet_backend: FleetBackendFactory | None = None


def set_fleet_backend(factory: FleetBackendFactory) -> None:
    global _fleet_backend  # noqa: PLW0603 - one registration at start-up
    _fleet_backend = factory


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """One line and exit 1 for anything the user can fix; never a traceback."""
    try:
        yield
    except (AgentError, ProvisioningError, OSError) as exc:
        print(f"error: {describe_user_error(exc)}", file=sys.stderr)
        raise typer.Exit(1) from None


@agent_app.command(
    "run",
    # Everything after `run` (--help too) goes to the one argparse definition in device_agent.main.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def run(ctx: typer.Context) -> None:
    """Run the agent until SIGTERM or Ctrl-C (then publish 'offline' and disconnect).

    Options: --store DIR (required), --broker HOST:PORT, --config FILE, --telemetry-interval S,
    --mqtt-version 5|311|auto, --session-expiry S, --auth mtls|jwt, --token-ttl S,
    --token-audience AUD, -v/--verbose. The same command as `iotauth-agent run`.
    """
    code = agent_main(["run", *ctx.args], prog="iotauth agent")
    if code:
        raise typer.Exit(code)


def _progress_printer() -> Callable[[FleetProgress], None]:
    """On a terminal one line rewritten every second; in a log a line every 5 seconds."""
    tty = sys.stderr.isatty()
    last = [-5.0]

    def show(p: FleetProgress) -> None:
        if not tty and p.elapsed_s - last[0] < 5.0:
            return
        last[0] = p.elapsed_s
        line = (
            f"{p.elapsed_s:3.0f}/{p.duration_s:.0f} s  online {p.online}/{p.expected_online}"
            f"  messages acked {p.messages_acked}"
        )
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    return show


@fleet_app.command("simulate")
def simulate(
    pki: Annotated[
        Path | None,
        typer.Option(
            "--pki",
            envvar="IOTAUTH_PKI",
            help="PKI whose trust domain and lifetimes the scratch PKI copies; with --into-pki "
            "the PKI that issues the fleet (env IOTAUTH_PKI).",
            show_default=False,
        ),
    ] = None,
    into_pki: Annotated[
        bool,
        typer.Option(
            "--into-pki",
            help="Issue the simulated devices into --pki itself (revoked at the end) instead of "
            "a scratch PKI; needed with --broker.",
        ),
    ] = False,
    devices: Annotated[int, typer.Option("--devices", help="How many simulated devices.")] = 100,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            metavar="HOST:PORT",
            help="A running broker of --pki (needs --into-pki); default: ours in-process.",
        ),
    ] = None,
    duration: Annotated[float, typer.Option("--duration", help="Seconds.")] = 30.0,
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            "--scenario",
            metavar="NAME",
            help="steady, storm, churn, revoked, renewal (repeatable).",
        ),
    ] = None,
    telemetry_interval: Annotated[
        float, typer.Option("--telemetry-interval", help="Seconds between messages per device.")
    ] = 5.0,
    reactors: Annotated[int, typer.Option("--reactors", help="Agent loop threads.")] = 4,
    mqtt5_share: Annotated[
        float | None,
        typer.Option(
            "--mqtt5-share",
            metavar="F",
            help="Fraction of the devices on MQTT 5, the rest on 3.1.1 (0 to 1); default: "
            "every device 'auto' (5, falling back to 3.1.1).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final report as JSON (progress: stderr).")
    ] = False,
) -> None:
    """Run N agents with real certificates against a broker and report what happened.

    By default the simulation issues into a scratch PKI of its own and runs our broker on it:
    the PKI given with --pki is only read (trust domain, lifetimes) and never changed.
    """
    from device_agent.fleet import FleetSpec, run_fleet

    with user_errors():
        spec = FleetSpec(
            devices=devices,
            duration=duration,
            scenarios=tuple(scenario or ["steady"]),
            telemetry_interval=telemetry_interval,
            reactors=reactors,
            mqtt5_share=mqtt5_share,
        )
        if _fleet_backend is None:
            msg = "the fleet simulator needs a PKI backend; run it as 'iotauth fleet simulate'"
            raise AgentError(msg)
        with tempfile.TemporaryDirectory(prefix="iotauth-fleet-") as tmp:
            backend = _fleet_backend(
                pki,
                broker,
                Path(tmp),
                into_pki=into_pki,
                names=spec.names,
                warn=lambda line: print(line, file=sys.stderr, flush=True),
            )
            where = f"{pki} (--into-pki)" if into_pki else "a scratch PKI"
            print(
                f"simulating {devices} devices for {duration:g} s from {where} against "
                f"{backend.broker}",
                file=sys.stderr,
                flush=True,
            )
            try:
                report = run_fleet(spec, backend, workdir=Path(tmp), progress=_progress_printer())
            finally:
                if sys.stderr.isatty():
                    print(file=sys.stderr)
                backend.close()
        if as_json:
            print(report.to_json())
        else:
            print("\n".join(report.lines()))
