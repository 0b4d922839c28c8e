"""broker: the MQTT broker (mutual TLS, identity from the certificate, per-identity ACLs).

May import ``provisioning`` (identity, CRL, registry) and nothing else of ours. Entry points:
:func:`run_broker` (async context manager), :class:`BrokerThread` (the same on a thread),
``broker.cli.broker_app`` (``iotauth broker run|explain``).
"""

from broker.audit import AuditLog
from broker.auth import Authenticated, Authenticator, ConnectionFacts, MutualTLSAuthenticator
from broker.errors import BrokerError, ConfigError, PolicyError, Refused, TopicError
from broker.metrics import Metrics
from broker.policy import (
    DEFAULT_POLICY_TOML,
    Action,
    Decision,
    Policy,
    Rule,
    default_policy,
    load_policy,
)
from broker.revocation import CRLState, RevocationWatcher
from broker.settings import BrokerSettings, Limits
from broker.topics import contains, matches, validate_filter, validate_topic

_LAZY = {"BrokerThread", "RunningBroker", "run_broker"}


def __getattr__(name: str) -> object:
    # broker.server brings the connection machinery and the renewal service (paho). Loading it
    # lazily keeps `iotauth --help` and `broker explain` light where only the policy is needed.
    if name in _LAZY:
        import broker.server

        return getattr(broker.server, name)
    msg = f"module 'broker' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = [
    "DEFAULT_POLICY_TOML",
    "Action",
    "AuditLog",
    "Authenticated",
    "Authenticator",
    "BrokerError",
    "BrokerSettings",
    "BrokerThread",
    "CRLState",
    "ConfigError",
    "ConnectionFacts",
    "Decision",
    "Limits",
    "Metrics",
    "MutualTLSAuthenticator",
    "Policy",
    "PolicyError",
    "Refused",
    "RevocationWatcher",
    "Rule",
    "RunningBroker",
    "TopicError",
    "contains",
    "default_policy",
    "load_policy",
    "matches",
    "run_broker",
    "validate_filter",
    "validate_topic",
]
