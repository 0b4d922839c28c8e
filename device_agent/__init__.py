"""device_agent: what runs on a device (MQTT over mutual TLS, telemetry, commands, renewal).

May import ``hardware`` (the credential store) and ``provisioning.identity`` / ``errors`` / ``tls``
only, so that ``pip install iotauth[agent]`` pulls no broker or station code. Entry points:
:class:`Agent`, :class:`AgentConfig` / :func:`load_config`, the slim command line
:mod:`device_agent.main` (``iotauth-agent``, ``python -m device_agent``), the typer apps
``device_agent.cli.agent_app`` and ``fleet_app``, and :mod:`device_agent.fleet` (many simulated
agents in one process). Nothing imported here loads cryptography, typer or rich. See docs/AGENT.md.
"""

from device_agent.agent import Agent, AgentStats, default_commands
from device_agent.backoff import Backoff, Failure
from device_agent.commands import Command, CommandRegistry, Reply
from device_agent.config import AgentConfig, load_config, parse_address
from device_agent.credentials import Credentials, load_credentials
from device_agent.errors import (
    AgentConfigError,
    AgentError,
    CredentialError,
    QueueError,
    RenewalError,
    TokenSigningError,
)
from device_agent.queue import MemoryQueue, SqliteQueue, open_queue
from device_agent.reactor import Reactor
from device_agent.telemetry import ENTRY_POINT_GROUP, load_source, system_telemetry

__all__ = [
    "ENTRY_POINT_GROUP",
    "Agent",
    "AgentConfig",
    "AgentConfigError",
    "AgentError",
    "AgentStats",
    "Backoff",
    "Command",
    "CommandRegistry",
    "CredentialError",
    "Credentials",
    "Failure",
    "MemoryQueue",
    "QueueError",
    "Reactor",
    "RenewalError",
    "Reply",
    "SqliteQueue",
    "TokenSigningError",
    "default_commands",
    "load_config",
    "load_credentials",
    "load_source",
    "open_queue",
    "parse_address",
    "system_telemetry",
]
