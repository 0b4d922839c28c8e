"""The agent's state tables (device_agent/states.py), by plain calls: every state reachable, the
paths the agent takes through them, and the moves the tables refuse."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import pytest

from device_agent.states import (
    CONNECTION,
    RENEWAL,
    Conn,
    ConnEvent,
    Machine,
    Renewal,
    RenewalEvent,
    TransitionError,
    renewal_state_for_phase,
)

R, RE = Renewal, RenewalEvent


def _reachable(table: Mapping[tuple[enum.Enum, enum.Enum], enum.Enum], start: enum.Enum) -> set:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (src, _), dst in table.items():
            if src is state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


def _walk(machine: Machine, events: list) -> list:
    return [machine.fire(e) for e in events]


@pytest.mark.parametrize(
    ("table", "states", "start"),
    [(CONNECTION, Conn, Conn.IDLE), (RENEWAL, Renewal, Renewal.IDLE)],
    ids=["connection", "renewal"],
)
def test_every_state_is_reachable_and_every_state_can_be_left(
    table: Mapping, states: type[enum.Enum], start: enum.Enum
) -> None:
    assert _reachable(table, start) == set(states)
    sources = {src for src, _ in table}
    assert sources == set(states), set(states) - sources


def test_connection_life() -> None:
    conn: Machine[Conn, ConnEvent] = Machine("connection", CONNECTION, Conn.IDLE)
    path = _walk(
        conn,
        [
            ConnEvent.ATTEMPT,
            ConnEvent.DOWN,  # refused or closed before CONNACK
            ConnEvent.DOWN,  # the next attempt failed before connecting (expired certificate)
            ConnEvent.ATTEMPT,
            ConnEvent.CONNACK,
            ConnEvent.DOWN,  # lost
            ConnEvent.ATTEMPT,
            ConnEvent.CONNACK,
            ConnEvent.STOP,
            ConnEvent.STOPPED,
            ConnEvent.ATTEMPT,  # started again
        ],
    )
    assert path == [
        Conn.CONNECTING,
        Conn.IDLE,
        Conn.IDLE,
        Conn.CONNECTING,
        Conn.CONNECTED,
        Conn.IDLE,
        Conn.CONNECTING,
        Conn.CONNECTED,
        Conn.STOPPING,
        Conn.STOPPED,
        Conn.CONNECTING,
    ]


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (Conn.IDLE, ConnEvent.CONNACK),  # a CONNACK without an attempt
        (Conn.CONNECTED, ConnEvent.ATTEMPT),  # a second client while connected
        (Conn.CONNECTING, ConnEvent.STOP),  # stop() tears an attempt down instead
        (Conn.STOPPING, ConnEvent.ATTEMPT),
        (Conn.STOPPED, ConnEvent.DOWN),
    ],
)
def test_connection_refuses_unplanned_moves(state: Conn, event: ConnEvent) -> None:
    conn: Machine[Conn, ConnEvent] = Machine("connection", CONNECTION, state)
    assert not conn.can(event)
    with pytest.raises(TransitionError, match=f"connection: no move from {state.value}"):
        conn.fire(event)
    assert conn.state is state  # unchanged


def test_renewal_happy_path() -> None:
    renew: Machine[Renewal, RenewalEvent] = Machine("renewal", RENEWAL, R.IDLE)
    path = _walk(
        renew,
        [
            RE.BEGIN,
            RE.KEY_MADE,
            RE.CERTIFICATE,
            RE.SWITCH,
            RE.SWITCHED,
            RE.ATTEMPT_CANDIDATE,
            RE.CANDIDATE_CONNECTED,
            RE.RECORDED,
        ],
    )
    assert path == [
        R.MAKING_KEY,
        R.REQUESTED,
        R.RECEIVED,
        R.SWITCHING,
        R.CANDIDATE_NEXT,
        R.TRYING,
        R.INSTALLED,
        R.IDLE,
    ]


def test_renewal_candidate_refused_then_given_up() -> None:
    """Refused twice, retried from the current credentials each time, given up the third."""
    renew: Machine[Renewal, RenewalEvent] = Machine("renewal", RENEWAL, R.RECEIVED)
    for _ in range(2):
        _walk(renew, [RE.SWITCH, RE.SWITCHED, RE.ATTEMPT_CANDIDATE])
        assert renew.fire(RE.CANDIDATE_REFUSED) is R.RECEIVED
    _walk(renew, [RE.SWITCH, RE.SWITCHED, RE.ATTEMPT_CANDIDATE])
    assert renew.fire(RE.GIVE_UP) is R.IDLE


def test_renewal_after_the_current_credentials_are_refused_for_good() -> None:
    """A restart found a received candidate; the old certificate is refused (superseded meanwhile):
    the candidate is tried, and once connected it is committed."""
    renew: Machine[Renewal, RenewalEvent] = Machine(
        "renewal", RENEWAL, renewal_state_for_phase("received")
    )
    assert _walk(renew, [RE.USE_CANDIDATE, RE.ATTEMPT_CANDIDATE, RE.INSTALL_FAILED]) == [
        R.CANDIDATE_NEXT,
        R.TRYING,
        R.CANDIDATE_NEXT,
    ]
    assert _walk(renew, [RE.ATTEMPT_CANDIDATE, RE.CANDIDATE_CONNECTED]) == [R.TRYING, R.INSTALLED]


@pytest.mark.parametrize(
    "state", [R.REQUESTED, R.RECEIVED, R.CANDIDATE_NEXT, R.INSTALLED, R.SWITCHING]
)
def test_a_refusal_ends_the_renewal(state: Renewal) -> None:
    renew: Machine[Renewal, RenewalEvent] = Machine("renewal", RENEWAL, state)
    after = renew.fire(RE.REFUSED)
    if state is R.SWITCHING:
        # The deliberate disconnect completes; the next attempt finds no candidate.
        assert after is R.SWITCHING
        assert _walk(renew, [RE.SWITCHED, RE.CANDIDATE_UNUSABLE]) == [R.CANDIDATE_NEXT, R.IDLE]
    else:
        assert after is R.IDLE


def test_key_generation_failure_and_bad_answer_start_over() -> None:
    renew: Machine[Renewal, RenewalEvent] = Machine("renewal", RENEWAL, R.IDLE)
    assert _walk(renew, [RE.BEGIN, RE.KEY_FAILED]) == [R.MAKING_KEY, R.IDLE]
    assert _walk(renew, [RE.BEGIN, RE.KEY_MADE, RE.BAD_ANSWER]) == [
        R.MAKING_KEY,
        R.REQUESTED,
        R.IDLE,
    ]


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (R.IDLE, RE.CERTIFICATE),  # an answer to nothing
        (R.MAKING_KEY, RE.BEGIN),  # a second key while one is being made
        (R.REQUESTED, RE.SWITCH),  # switching before a certificate was checked
        (R.RECEIVED, RE.ATTEMPT_CANDIDATE),  # the candidate only after switch or use-candidate
        (R.INSTALLED, RE.CERTIFICATE),
        (R.TRYING, RE.REFUSED),  # answers arrive only once connected
        (R.IDLE, RE.RECORDED),
    ],
)
def test_renewal_refuses_unplanned_moves(state: Renewal, event: RenewalEvent) -> None:
    renew: Machine[Renewal, RenewalEvent] = Machine("renewal", RENEWAL, state)
    with pytest.raises(TransitionError, match=f"renewal: no move from {state.value}"):
        renew.fire(event)
    assert renew.state is state


@pytest.mark.parametrize(
    ("phase", "state"),
    [
        (None, R.IDLE),
        ("requested", R.REQUESTED),
        ("received", R.RECEIVED),
        ("installed", R.INSTALLED),
        ("nonsense", R.IDLE),
    ],
)
def test_a_restarted_agent_starts_from_the_phase_on_disk(phase: str | None, state: Renewal) -> None:
    assert renewal_state_for_phase(phase) is state
