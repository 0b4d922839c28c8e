"""MQTT 3.1.1 section 4.7 matching and filter containment, against a brute-force reference."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import TopicError
from broker.topics import contains, matches, validate_filter, validate_topic

# -- a reference written straight from the spec text, sharing no code with broker.topics ----------


def ref_matches(topic_filter: str, topic: str) -> bool:
    """§4.7: translate the filter to a regex over the topic string."""
    if topic.startswith("$") and topic_filter[:1] in "+#":
        return False  # MQTT-4.7.2-1
    parts = topic_filter.split("/")
    pattern = ""
    for i, part in enumerate(parts):
        sep = "/" if i else ""
        if part == "#":
            # '#' matches the parent and any number of child levels (MQTT-4.7.1-2)
            pattern += "(/.*)?" if i else ".*"
        elif part == "+":
            pattern += sep + "[^/]*"
        else:
            pattern += sep + re.escape(part)
    return re.fullmatch(pattern, topic, flags=re.DOTALL) is not None


LEVELS = ["a", "b", "$s", ""]
UNIVERSE_LEVELS = [*LEVELS, "z"]  # 'z' appears in no filter: stands for "any other name"


def universe(max_len: int) -> list[str]:
    topics = []
    for n in range(1, max_len + 1):
        topics += ["/".join(p) for p in itertools.product(UNIVERSE_LEVELS, repeat=n)]
    return topics


def ref_contains(outer: str, inner: str) -> bool:
    longest = max(outer.count("/"), inner.count("/")) + 2
    return all(ref_matches(outer, t) for t in universe(longest) if ref_matches(inner, t))


filter_level = st.sampled_from([*LEVELS, "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(filter_level, min_size=1, max_size=3))
    if draw(st.booleans()):
        levels.append("#")
    value = "/".join(levels)
    return value or "a"


topics = (
    st.lists(st.sampled_from(UNIVERSE_LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
)


@settings(max_examples=400, deadline=None)
@given(filters(), topics)
def test_matches_agrees_with_reference(topic_filter: str, topic: str) -> None:
    """matches() equals the regex reference on arbitrary filters and topics."""
    assert matches(topic_filter, topic) == ref_matches(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(filters(), filters())
def test_contains_agrees_with_reference(outer: str, inner: str) -> None:
    """contains() equals 'every topic the inner filter matches, the outer one matches too'."""
    assert contains(outer, inner) == ref_contains(outer, inner)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b/#", "a/b", True),  # '#' includes the parent level
        ("a/b/#", "a/b/c/d", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),  # an empty level is a level
        ("#", "$SYS/broker/uptime", False),  # wildcards never match '$' topics
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("devices/+/state", "devices/dev-1/state", True),
        ("devices/+/state", "devices/dev-1/state/x", False),
    ],
)
def test_matches_examples(topic_filter: str, topic: str, expected: bool) -> None:
    """The cases amqtt's topic_ac gets wrong, and their positive twins."""
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("devices/dev-1/+", "devices/dev-1/#", False),  # '+' must not grant '#' (amqtt: True)
        ("devices/dev-1/#", "devices/dev-1/+", True),
        ("devices/dev-1/#", "devices/dev-1", True),
        ("devices/+/telemetry/#", "devices/dev-1/telemetry/t", True),
        ("devices/+/telemetry/#", "devices/+/+/t", False),
        ("a/#", "a/+/#", True),
        ("a/+/#", "a/#", False),  # 'a/#' matches 'a' itself
        ("#", "$SYS/#", False),
        ("+/#", "#", True),
    ],
)
def test_containment_examples(outer: str, inner: str, expected: bool) -> None:
    """SUBSCRIBE is judged by containment, not by string or topic matching."""
    assert contains(outer, inner) is expected


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a\x00b"])
def test_invalid_filters_are_refused(bad: str) -> None:
    """Filters breaking §4.7.1 raise TopicError."""
    with pytest.raises(TopicError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\x00"])
def test_invalid_topic_names_are_refused(bad: str) -> None:
    """Topic names carry no wildcards, are not empty and contain no NUL."""
    with pytest.raises(TopicError):
        validate_topic(bad)


def test_valid_names_and_filters_pass() -> None:
    """Positive twins of the two tests above."""
    assert validate_topic("a//b") == "a//b"
    assert validate_filter("+/+/#") == "+/+/#"
