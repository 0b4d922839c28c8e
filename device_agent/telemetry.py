"""Telemetry sources: what the agent publishes on ``devices/<id>/telemetry``.

A source is any callable that takes no argument and returns a JSON-able mapping of readings. The
agent calls it every ``telemetry.interval`` seconds on its own loop, so it must be quick (read a
file, not poll a slow sensor; let a sensor thread keep the latest value).

Plug in your own with a Python entry point in the group ``iotauth.telemetry``::

    # your package's pyproject.toml
    [project.entry-points."iotauth.telemetry"]
    greenhouse = "greenhouse.sensors:read"     # def read() -> dict[str, float]

and select it with ``[telemetry] source = "greenhouse"`` in agent.toml. ``"module:function"`` works
without an entry point too. The default, :func:`system_telemetry`, reports uptime, load, memory and,
on a Raspberry Pi (any Linux with a thermal zone), the SoC temperature.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from device_agent.errors import AgentConfigError

__all__ = ["ENTRY_POINT_GROUP", "TelemetrySource", "load_source", "system_telemetry"]

ENTRY_POINT_GROUP = "iotauth.telemetry"
TelemetrySource = Callable[[], Mapping[str, Any]]

_PROC = Path("/proc")
_THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def system_telemetry() -> dict[str, Any]:
    """Uptime (s), 1/5/15-minute load, memory (kB) and SoC temperature (deg C) where available."""
    out: dict[str, Any] = {}
    uptime = _read(_PROC / "uptime")
    if uptime:
        out["uptime_s"] = round(float(uptime.split()[0]), 1)
    with contextlib.suppress(OSError):
        out["load"] = [round(x, 2) for x in os.getloadavg()]
    meminfo = _read(_PROC / "meminfo")
    if meminfo:
        fields = {}
        for line in meminfo.splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                fields[key] = int(rest.split()[0])
        if fields:
            out["mem_total_kb"] = fields.get("MemTotal")
            out["mem_available_kb"] = fields.get("MemAvailable")
    temp = _read(_THERMAL)
    if temp and temp.strip().lstrip("-").isdigit():
        out["soc_temp_c"] = int(temp.strip()) / 1000
    return out


def load_source(name: str) -> TelemetrySource:
    """``default``, an entry point name in ``iotauth.telemetry``, or ``module:function``."""
    if name == "default":
        return system_telemetry
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _callable(ep.load(), name)
    module_name, sep, attr = name.partition(":")
    if sep:
        try:
            module = importlib.import_module(module_name)
            return _callable(getattr(module, attr), name)
        except (ImportError, AttributeError) as exc:
            msg = f"telemetry source {name!r} cannot be loaded: {exc}"
            raise AgentConfigError(msg) from None
    msg = f"no telemetry source {name!r} (entry point group {ENTRY_POINT_GROUP})"
    raise AgentConfigError(msg)


def _callable(obj: object, name: str) -> TelemetrySource:
    if not callable(obj):
        msg = f"telemetry source {name!r} is not callable"
        raise AgentConfigError(msg)
    return obj
