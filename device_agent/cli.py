"""``iotauth agent run`` and ``iotauth fleet simulate`` (typer apps; the root mounts them).

Errors a user can fix end in one ``error:`` line on stderr and exit 1, never a traceback.
``agent run`` hands its arguments to ``device_agent.main``, the slim command line a device runs
(``iotauth-agent run``), so its options are defined once, there.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from device_agent.errors import AgentError
from device_agent.main import describe_user_error
from device_agent.main import main as agent_main
from provisioning.errors import ProvisioningError

__all__ = ["agent_app", "fleet_app", "set_fleet_backend", "user_errors"]

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


# Set by the composition root: (pki_dir, broker or None, workdir) -> a FleetBackend with close().
_fleet_backend: Callable[[Path, str | None, Path], Any] | None = None


def set_fleet_backend(factory: Callable[[Path, str | None, Path], Any]) -> None:
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
    -v/--verbose. The same command as `iotauth-agent run`.
    """
    code = agent_main(["run", *ctx.args], prog="iotauth agent")
    if code:
        raise typer.Exit(code)


@fleet_app.command("simulate")
def simulate(
    pki: Annotated[Path, typer.Option("--pki", help="The PKI directory that issues the fleet.")],
    devices: Annotated[int, typer.Option("--devices", help="How many simulated devices.")] = 100,
    broker: Annotated[
        str | None, typer.Option("--broker", help="HOST:PORT; default: our broker in-process.")
    ] = None,
    duration: Annotated[float, typer.Option("--duration", help="Seconds.")] = 30.0,
    scenario: Annotated[
        list[str] | None,
        typer.Option("--scenario", help="steady, storm, churn, revoked, renewal (repeatable)."),
    ] = None,
    telemetry_interval: Annotated[float, typer.Option("--telemetry-interval")] = 5.0,
    reactors: Annotated[int, typer.Option("--reactors", help="Agent loop threads.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run N agents with real certificates against a broker and report what happened."""
    from device_agent.fleet import FleetSpec, run_fleet

    with user_errors():
        spec = FleetSpec(
            devices=devices,
            duration=duration,
            scenarios=tuple(scenario or ["steady"]),
            telemetry_interval=telemetry_interval,
            reactors=reactors,
        )
        if _fleet_backend is None:
            msg = "the fleet simulator needs a PKI backend; run it as 'iotauth fleet simulate'"
            raise AgentError(msg)
        with tempfile.TemporaryDirectory(prefix="iotauth-fleet-") as tmp:
            backend = _fleet_backend(pki, broker, Path(tmp))
            try:
                report = run_fleet(spec, backend, workdir=Path(tmp))
            finally:
                backend.close()
        if as_json:
            print(report.to_json())
        else:
            print("\n".join(report.lines()))
