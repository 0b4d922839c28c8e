"""The agent's two state machines, each an Enum of states and one transition table.

The :class:`~device_agent.agent.Agent` changes state only through :meth:`Machine.fire`, so every
move it can make is listed here, and a move the table lacks is a bug that raises at once
(``TransitionError``) instead of leaving the agent in a state nobody planned for.

Connection (``CONNECTION``)::

    idle --attempt--> connecting --connack--> connected --stop--> stopping --stopped--> stopped
      ^                   |                       |
      +------ down -------+----------down---------+          (idle --stopped--> stopped)

``down`` is every way a connection or an attempt ends (refused, closed before CONNACK, no
CONNACK in time, lost, dropped); what to try next is the agent's backoff, not the table's. Two
ends are followed by an attempt at once, without backoff: a broker that refused MQTT 5 (the next
attempt speaks 3.1.1) and a deliberate reconnect with a fresh device token (``--auth jwt``).
A stopped agent may be started again (``stopped --attempt--> connecting``).

Renewal (``RENEWAL``): the in-memory side of ``device_agent.renewal``. The store's phase on disk
(``requested`` / ``received`` / ``installed``) survives a restart and gives the starting state
(:func:`renewal_state_for_phase`); the states between them exist only while the agent runs::

    idle --begin--> making-key --key-made--> requested --certificate--> received
     ^  <--key-failed--+                                                   |
     |                                                       switch (connected): disconnect
     |                                                                     v
     |        candidate-next <--switched-- switching    received --use-candidate--> candidate-next
     |              |  (the next attempt uses the candidate)
     |        attempt-candidate
     |              v
     |           trying --candidate-refused--> received (try again later, at most 3 times)
     |              |  --give-up--> idle (refused for good, or the third time)
     |        candidate-connected (committed to the credential directory)
     |              v
     +--recorded-- installed  (reports "installed" until the service answers "recorded")

    any waiting state --refused--> idle (the service refused: start again after renewal_retry)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from device_agent.errors import AgentError

__all__ = [
    "CONNECTION",
    "RENEWAL",
    "Conn",
    "ConnEvent",
    "Machine",
    "Renewal",
    "RenewalEvent",
    "TransitionError",
    "renewal_state_for_phase",
]

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class TransitionError(AgentError):
    """A move that the machine's table does not allow (a bug in the agent)."""


class Machine(Generic[S, E]):
    """A current state and the table it moves by."""

    def __init__(self, name: str, table: Mapping[tuple[S, E], S], state: S) -> None:
        self.name = name
        self.table = table
        self.state = state

    def can(self, event: E) -> bool:
        return (self.state, event) in self.table

    def fire(self, event: E) -> S:
        try:
            self.state = self.table[(self.state, event)]
        except KeyError:
            msg = f"{self.name}: no move from {self.state.value} on {event.value}"
            raise TransitionError(msg) from None
        return self.state


# -- connection ---------------------------------------------------------------------------------


class Conn(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    STOPPING = "stopping"  # "offline" published, DISCONNECT on its way
    STOPPED = "stopped"


class ConnEvent(enum.Enum):
    ATTEMPT = "attempt"  # a client was made and the TCP/TLS connect started
    CONNACK = "connack"  # CONNACK 0
    DOWN = "down"  # the attempt or the connection ended
    STOP = "stop"  # stop() while connected
    STOPPED = "stopped"


CONNECTION: dict[tuple[Conn, ConnEvent], Conn] = {
    (Conn.IDLE, ConnEvent.ATTEMPT): Conn.CONNECTING,
    (Conn.STOPPED, ConnEvent.ATTEMPT): Conn.CONNECTING,
    (Conn.CONNECTING, ConnEvent.CONNACK): Conn.CONNECTED,
    (Conn.CONNECTING, ConnEvent.DOWN): Conn.IDLE,
    (Conn.CONNECTED, ConnEvent.DOWN): Conn.IDLE,
    # An attempt that failed before it had a connection (expired certificate, unusable files).
    (Conn.IDLE, ConnEvent.DOWN): Conn.IDLE,
    (Conn.CONNECTED, ConnEvent.STOP): Conn.STOPPING,
    (Conn.IDLE, ConnEvent.STOPPED): Conn.STOPPED,
    (Conn.STOPPING, ConnEvent.STOPPED): Conn.STOPPED,
}


# -- renewal ------------------------------------------------------------------------------------


class Renewal(enum.Enum):
    IDLE = "idle"  # no renewal in progress
    MAKING_KEY = "making-key"  # key and CSR being made off the loop
    REQUESTED = "requested"  # CSR sent (again on every new connection); waiting for the answer
    RECEIVED = "received"  # a checked candidate waits for a connection to try it on
    SWITCHING = "switching"  # disconnecting on purpose, to reconnect with the candidate
    CANDIDATE_NEXT = "candidate-next"  # the next attempt uses the candidate
    TRYING = "trying"  # the attempt in flight uses the candidate
    INSTALLED = "installed"  # committed; reporting "installed" until "recorded"


class RenewalEvent(enum.Enum):
    BEGIN = "begin"
    KEY_MADE = "key-made"
    KEY_FAILED = "key-failed"
    CERTIFICATE = "certificate"  # an answer passed every check (RenewalStore.accept)
    BAD_ANSWER = "bad-answer"  # an answer that did not
    SWITCH = "switch"
    SWITCHED = "switched"  # the deliberate disconnect happened
    USE_CANDIDATE = "use-candidate"  # the current credentials were refused for good
    ATTEMPT_CANDIDATE = "attempt-candidate"
    CANDIDATE_UNUSABLE = "candidate-unusable"  # no candidate on disk, or its files are broken
    CANDIDATE_REFUSED = "candidate-refused"
    GIVE_UP = "give-up"
    CANDIDATE_CONNECTED = "candidate-connected"
    INSTALL_FAILED = "install-failed"
    RECORDED = "recorded"
    REFUSED = "refused"
    FORGOTTEN = "forgotten"  # the state on disk is gone (damaged, or removed by hand)


_R, _RE = Renewal, RenewalEvent

RENEWAL: dict[tuple[Renewal, RenewalEvent], Renewal] = {
    (_R.IDLE, _RE.BEGIN): _R.MAKING_KEY,
    (_R.MAKING_KEY, _RE.KEY_MADE): _R.REQUESTED,
    (_R.MAKING_KEY, _RE.KEY_FAILED): _R.IDLE,
    (_R.REQUESTED, _RE.CERTIFICATE): _R.RECEIVED,
    (_R.REQUESTED, _RE.BAD_ANSWER): _R.IDLE,
    (_R.RECEIVED, _RE.SWITCH): _R.SWITCHING,
    (_R.CANDIDATE_NEXT, _RE.SWITCH): _R.SWITCHING,
    (_R.SWITCHING, _RE.SWITCH): _R.SWITCHING,
    (_R.SWITCHING, _RE.SWITCHED): _R.CANDIDATE_NEXT,
    (_R.RECEIVED, _RE.USE_CANDIDATE): _R.CANDIDATE_NEXT,
    (_R.CANDIDATE_NEXT, _RE.USE_CANDIDATE): _R.CANDIDATE_NEXT,
    (_R.CANDIDATE_NEXT, _RE.ATTEMPT_CANDIDATE): _R.TRYING,
    # A connection lost while switching: the next attempt still uses the candidate.
    (_R.SWITCHING, _RE.ATTEMPT_CANDIDATE): _R.TRYING,
    (_R.CANDIDATE_NEXT, _RE.CANDIDATE_UNUSABLE): _R.IDLE,
    (_R.SWITCHING, _RE.CANDIDATE_UNUSABLE): _R.IDLE,
    (_R.TRYING, _RE.CANDIDATE_REFUSED): _R.RECEIVED,
    (_R.TRYING, _RE.GIVE_UP): _R.IDLE,
    (_R.TRYING, _RE.CANDIDATE_CONNECTED): _R.INSTALLED,
    # Connected with the candidate but it could not be committed: the next connection tries again.
    (_R.TRYING, _RE.INSTALL_FAILED): _R.CANDIDATE_NEXT,
    (_R.INSTALLED, _RE.RECORDED): _R.IDLE,
    # A refusal ends the renewal; a deliberate disconnect in progress still completes, and the
    # attempt after it finds no candidate (candidate-unusable) and uses the current credentials.
    (_R.REQUESTED, _RE.REFUSED): _R.IDLE,
    (_R.RECEIVED, _RE.REFUSED): _R.IDLE,
    (_R.CANDIDATE_NEXT, _RE.REFUSED): _R.IDLE,
    (_R.INSTALLED, _RE.REFUSED): _R.IDLE,
    (_R.SWITCHING, _RE.REFUSED): _R.SWITCHING,
    (_R.REQUESTED, _RE.FORGOTTEN): _R.IDLE,
    (_R.RECEIVED, _RE.FORGOTTEN): _R.IDLE,
    (_R.CANDIDATE_NEXT, _RE.FORGOTTEN): _R.IDLE,
    (_R.INSTALLED, _RE.FORGOTTEN): _R.IDLE,
}

_PHASES = {
    None: Renewal.IDLE,
    "requested": Renewal.REQUESTED,
    "received": Renewal.RECEIVED,
    "installed": Renewal.INSTALLED,
}


def renewal_state_for_phase(phase: str | None) -> Renewal:
    """Where a restarted agent picks up: the phase ``device_agent.renewal`` left on disk."""
    return _PHASES.get(phase, Renewal.IDLE)
