"""MQTT 3.1.1 topic names and filters (section 4.7), as pure functions: no I/O, no amqtt.

Rules implemented exactly:

- Levels are separated by ``/``; empty levels are legal (``a//b``, ``/a``).
- ``+`` matches exactly one level and must fill its level; ``#`` matches any number of levels,
  *including the parent level* (``a/#`` matches ``a``), and must be the last level.
- A filter whose first level is a wildcard never matches a topic that starts with ``$``.
- Topic names carry no wildcards; neither names nor filters may be empty or contain U+0000.

``contains(outer, inner)`` answers "is every topic that ``inner`` matches also matched by
``outer``?", which is how SUBSCRIBE is authorised: comparing strings would let ``+`` grant ``#``.
"""

from __future__ import annotations

from broker.errors import TopicError

__all__ = [
    "MAX_TOPIC_BYTES",
    "contains",
    "is_wildcard",
    "matches",
    "validate_filter",
    "validate_topic",
]

MAX_TOPIC_BYTES = 65535  # a UTF-8 string with a 16-bit length prefix (section 1.5.3)


def _common(value: str, what: str) -> None:
    if not value:
        raise TopicError(value, "it is empty", what=what)
    if "\x00" in value:
        raise TopicError(value, "it contains U+0000", what=what)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise TopicError(value, f"it is longer than {MAX_TOPIC_BYTES} bytes", what=what)


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name (what PUBLISH carries); else TopicError."""
    _common(topic, "topic name")
    if "+" in topic or "#" in topic:
        raise TopicError(topic, "a topic name cannot contain '+' or '#'", what="topic name")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid filter (what SUBSCRIBE carries); else TopicError."""
    _common(topic_filter, "topic filter")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise TopicError(
                topic_filter, "'#' must be a whole level and the last one", what="topic filter"
            )
        if "+" in level and level != "+":
            raise TopicError(topic_filter, "'+' must be a whole level", what="topic filter")
    return topic_filter


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Does ``topic_filter`` match the topic name ``topic``? Both must already be valid."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            # '#' also matches the parent: 'a/#' matches 'a' (t_levels has `index` levels).
            return len(t_levels) >= index
        if index >= len(t_levels):
            return False
        if level not in ("+", t_levels[index]):
            return False
    return len(f_levels) == len(t_levels)


def contains(outer: str, inner: str) -> bool:
    """Is every topic matched by filter ``inner`` also matched by filter ``outer``?

    Walks both filters level by level; a literal is covered by the same literal or ``+``, ``+`` only
    by ``+``, and ``#`` only by ``#``. The ``$`` rule makes a leading wildcard in ``outer`` cover
    nothing that begins with a literal ``$`` level in ``inner``.
    """
    o_levels = outer.split("/")
    i_levels = inner.split("/")
    if o_levels[0] in ("+", "#") and i_levels[0].startswith("$"):
        return False
    for index, o_level in enumerate(o_levels):
        if o_level == "#":
            # Everything below (and the parent) is covered; the parent exists only if index >= 1,
            # and an inner filter always has at least `index` levels here.
            return True
        if index >= len(i_levels):
            return False  # inner matches a shorter topic that outer (no '#' here) does not
        i_level = i_levels[index]
        if i_level == "#":
            # Inner reaches arbitrarily deep and outer has a fixed level here. One exception: a
            # bare '#' matches topics of one level or more, and so does '+/#' ('#' takes the
            # parent), with the same '$' exclusion.
            return index == 0 and o_levels == ["+", "#"]
        if o_level == "+":
            continue  # covers any single level, including inner's '+' and literals
        if i_level != o_level:
            return False  # inner '+' is wider than a literal, or two different literals
    return len(o_levels) == len(i_levels)
