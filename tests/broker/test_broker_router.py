"""Subscription and retained tries (``broker.router``) against ``broker.topics.matches``.

Every answer of the tries is compared with a brute-force scan that applies ``matches`` to each
stored filter or topic: exhaustively over a small universe of levels (``''``, ``'$SYS'``, ``'$x'``,
``'a'``, ``'b'``, ``'+'``, ``'#'``), and on generated sequences of adds, removes and routes, so the
route cache and the pruning of empty branches are exercised between the lookups.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import TopicError
from broker.router import RetainedStore, SubscriptionIndex, _Node, _RNode
from broker.topics import matches, validate_filter, validate_topic

NAMES = ["", "$SYS", "$x", "a", "b"]
FILTER_LEVELS = [*NAMES, "+", "#"]
KEYS = ["k0", "k1", "k2", "k3"]


def _valid(value: str, validate: Callable[[str], str]) -> bool:
    try:
        validate(value)
    except TopicError:
        return False
    return True


def universe_topics(max_levels: int) -> list[str]:
    out = []
    for n in range(1, max_levels + 1):
        out += ["/".join(p) for p in itertools.product(NAMES, repeat=n)]
    return [t for t in out if _valid(t, validate_topic)]


def universe_filters(max_levels: int) -> list[str]:
    out = []
    for n in range(1, max_levels + 1):
        out += ["/".join(p) for p in itertools.product(FILTER_LEVELS, repeat=n)]
    return [f for f in out if _valid(f, validate_filter)]


TOPICS_3 = universe_topics(3)  # 154 names, 'a' to '$x/b/'
TOPICS_4 = universe_topics(4)
FILTERS_3 = universe_filters(3)  # every valid filter of up to 3 levels, '#' last if anywhere

topic_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5).map("/".join).filter(bool)
filter_st = st.builds(
    lambda levels, hash_last: "/".join([*levels, "#"] if hash_last else levels),
    st.lists(st.sampled_from([*NAMES, "+"]), max_size=4),
    st.booleans(),
).filter(lambda f: _valid(f, validate_filter))  # drops '' (the only invalid one built)
qos_st = st.integers(0, 2)
key_st = st.sampled_from(KEYS)


def expected_route(subs: dict[tuple[str, str], int], topic: str) -> dict[str, int]:
    """Brute force: every subscriber with a matching filter, at its highest QoS among them."""
    out: dict[str, int] = {}
    for (topic_filter, key), qos in subs.items():
        if matches(topic_filter, topic):
            out[key] = max(out.get(key, -1), qos)
    return out


def routed(index: SubscriptionIndex[str], topic: str) -> dict[str, int]:
    result = index.route(topic)
    found = dict(result)
    assert len(found) == len(result), f"a subscriber appears twice for {topic!r}: {result}"
    return found


def dead_nodes(node: _Node[str] | _RNode[int], path: str = "") -> Iterable[str]:
    """Paths of non-root nodes that hold nothing and lead nowhere (pruning missed them)."""
    for level, child in node.children.items():
        here = f"{path}/{level}" if path else level or "''"
        held = child.members if isinstance(child, _Node) else child.value is not None
        if not held and not child.children:
            yield here
        yield from dead_nodes(child, here)


def test_universe_is_what_the_docstring_says() -> None:
    """The generators keep only valid names and filters, and include the corner cases."""
    assert len(TOPICS_3) == 4 + 25 + 125  # a single empty level is the empty name: invalid
    assert {"/", "$SYS", "$x/", "a//b"} <= set(TOPICS_3)
    assert {"#", "+/#", "$SYS/#", "a/+/#", "/+", "+"} <= set(FILTERS_3)
    assert "a/#/b" not in FILTERS_3
    assert "##" not in FILTERS_3


# -- SubscriptionIndex -----------------------------------------------------------------------------


def test_index_routes_every_topic_as_matches_does() -> None:
    """Each valid filter of up to 3 levels is its own subscriber; every topic of up to 4 levels
    reaches exactly the filters that match it."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for topic_filter in FILTERS_3:
        index.add(topic_filter, topic_filter, 1)
    assert index.filters == len(FILTERS_3)
    for topic in TOPICS_4:
        want = {f for f in FILTERS_3 if matches(f, topic)}
        assert set(routed(index, topic)) == want, topic


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(filter_st, key_st, qos_st), max_size=12),
    st.lists(topic_st, min_size=1, max_size=10),
)
def test_index_route_is_max_qos_per_subscriber(
    subscriptions: list[tuple[str, str, int]], topics: list[str]
) -> None:
    """Overlapping filters of one subscriber give one entry, at the highest matching QoS;
    re-adding a filter replaces its QoS."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    model: dict[tuple[str, str], int] = {}
    for topic_filter, key, qos in subscriptions:
        index.add(topic_filter, key, qos)
        model[topic_filter, key] = qos
    assert index.filters == len(model)
    for topic in [*topics, *TOPICS_3[:40]]:
        assert routed(index, topic) == expected_route(model, topic), topic


operation = st.one_of(
    st.tuples(st.just("add"), filter_st, key_st, qos_st),
    st.tuples(st.just("remove"), filter_st, key_st, st.just(0)),
    st.tuples(st.just("route"), topic_st, st.just(""), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(operation, max_size=40), st.lists(topic_st, min_size=1, max_size=6))
def test_index_stays_right_through_adds_removes_and_cached_routes(
    operations: list[tuple[str, str, str, int]], probes: list[str]
) -> None:
    """Routes are cached; any add or remove in between must not leave a stale answer."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    model: dict[tuple[str, str], int] = {}
    for op, value, key, qos in operations:
        if op == "add":
            index.add(value, key, qos)
            model[value, key] = qos
        elif op == "remove":
            assert index.remove(value, key) is ((value, key) in model)
            model.pop((value, key), None)
        else:
            assert routed(index, value) == expected_route(model, value)
        assert index.filters == len(model)
        for topic in probes:  # fills the cache before the next operation
            assert routed(index, topic) == expected_route(model, topic)
    assert list(dead_nodes(index._root)) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(filter_st, key_st), min_size=1, max_size=15), st.randoms())
def test_index_prunes_to_an_empty_root(
    subscriptions: list[tuple[str, str]], rng: random.Random
) -> None:
    """Removing every subscription, in any order, leaves no node behind; no dead node ever
    remains in between, and the cache forgets the removed subscribers."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for topic_filter, key in subscriptions:
        index.add(topic_filter, key, 0)
    pending = sorted(set(subscriptions))
    rng.shuffle(pending)
    model = dict.fromkeys(pending, 0)
    for topic_filter, key in pending:
        for topic in TOPICS_3[::7]:
            routed(index, topic)  # cache something
        assert index.remove(topic_filter, key)
        assert not index.remove(topic_filter, key)  # twice: nothing left to remove
        del model[topic_filter, key]
        assert list(dead_nodes(index._root)) == []
        for topic in TOPICS_3[::7]:
            assert routed(index, topic) == expected_route(model, topic)
    assert index._root.children == {}
    assert index._root.members == {}
    assert index.filters == 0


def test_index_examples() -> None:
    """The MQTT rules one by one: '#' takes the parent, '+' one (maybe empty) level, '$'."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a/#", "hash", 0)
    index.add("a/+", "plus", 1)
    index.add("#", "all", 0)
    index.add("+/+", "two", 0)
    index.add("$SYS/#", "sys", 2)
    index.add("/", "slash", 0)
    assert routed(index, "a") == {"hash": 0, "all": 0}
    assert routed(index, "a/") == {"hash": 0, "plus": 1, "all": 0, "two": 0}
    assert routed(index, "a/b/c") == {"hash": 0, "all": 0}
    assert routed(index, "/") == {"all": 0, "two": 0, "slash": 0}
    assert routed(index, "$SYS") == {"sys": 2}
    assert routed(index, "$SYS/x") == {"sys": 2}
    assert routed(index, "$x/y") == {}  # no wildcard-first filter reaches a '$' topic
    assert routed(index, "b/$x") == {"all": 0, "two": 0}  # '$' only counts in the first level


def test_index_max_qos_across_filters_of_one_subscriber() -> None:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a/+", "k", 0)
    index.add("a/#", "k", 2)
    index.add("a/b", "k", 1)
    index.add("a/b", "other", 0)
    assert sorted(index.route("a/b")) == [("k", 2), ("other", 0)]
    assert index.route("a/c") == [("k", 2)]
    assert index.filters == 4
    assert index.remove("a/#", "k")
    assert sorted(index.route("a/b")) == [("k", 1), ("other", 0)]
    index.add("a/b", "k", 0)  # same filter again: QoS replaced (downgraded), not added
    assert index.filters == 3
    assert sorted(index.route("a/b")) == [("k", 0), ("other", 0)]


def test_index_cache_is_invalidated_by_add_and_remove() -> None:
    """route, change, route again: never the cached answer from before the change."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.route("devices/dev-1/state") == []
    index.add("devices/+/state", "sink", 1)
    assert index.route("devices/dev-1/state") == [("sink", 1)]
    index.add("devices/+/state", "sink", 2)
    assert index.route("devices/dev-1/state") == [("sink", 2)]
    index.add("devices/dev-1/#", "dev-1", 0)
    assert dict(index.route("devices/dev-1/state")) == {"sink": 2, "dev-1": 0}
    assert index.remove("devices/+/state", "sink")
    assert index.route("devices/dev-1/state") == [("dev-1", 0)]
    assert index.remove("devices/dev-1/#", "dev-1")
    assert index.route("devices/dev-1/state") == []


def test_index_remove_of_what_is_not_there() -> None:
    """Unknown filter, unknown subscriber, or a prefix of a filter: False, nothing pruned."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("a/b/c", "k", 1)
    assert not index.remove("a/b", "k")  # a node on the way, not a subscription
    assert not index.remove("a/b/c", "other")
    assert not index.remove("a/b/c/d", "k")
    assert not index.remove("x", "k")
    assert index.filters == 1
    assert index.route("a/b/c") == [("k", 1)]
    index.add("a", "k", 0)
    assert index.remove("a", "k")  # a filter that is also a branch keeps its branch
    assert index.route("a/b/c") == [("k", 1)]
    assert index.route("a") == []
    assert index.remove("a/b/c", "k")
    assert index._root.children == {}


def test_index_cache_is_bounded() -> None:
    """Many distinct topics do not grow the cache without bound, and answers stay right."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("t/+", "k", 1)
    for i in range(9000):
        assert index.route(f"t/{i}") == [("k", 1)]
    assert len(index._cache) <= 8192
    assert index.route("t/x/y") == []


# -- RetainedStore ---------------------------------------------------------------------------------


def expected_matching(model: dict[str, int], topic_filter: str) -> dict[str, int]:
    return {t: v for t, v in model.items() if matches(topic_filter, t)}


def matched(store: RetainedStore[int], topic_filter: str) -> dict[str, int]:
    result = list(store.matching(topic_filter))
    found = dict(result)
    assert len(found) == len(result), f"a topic is yielded twice for {topic_filter!r}: {result}"
    return found


def test_retained_matching_agrees_with_matches_everywhere() -> None:
    """Every topic of up to 3 levels retained; every filter of up to 3 levels (and every topic
    of up to 4 levels, as a filter without wildcards) finds exactly the topics it matches."""
    store: RetainedStore[int] = RetainedStore()
    model = {topic: i for i, topic in enumerate(TOPICS_3)}
    for topic, value in model.items():
        store.set(topic, value)
    assert store.count == len(model)
    for topic_filter in [*FILTERS_3, *TOPICS_4]:
        assert matched(store, topic_filter) == expected_matching(model, topic_filter), topic_filter


retained_op = st.one_of(
    st.tuples(st.just("set"), topic_st, st.integers(0, 9)),
    st.tuples(st.just("delete"), topic_st, st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(retained_op, max_size=30), st.lists(filter_st, min_size=1, max_size=12))
def test_retained_store_through_sets_and_deletes(
    operations: list[tuple[str, str, int]], filters: list[str]
) -> None:
    """set overwrites, delete removes (or does nothing), count follows, get and matching agree."""
    store: RetainedStore[int] = RetainedStore()
    model: dict[str, int] = {}
    for op, topic, value in operations:
        if op == "set":
            store.set(topic, value)
            model[topic] = value
        else:
            store.delete(topic)
            model.pop(topic, None)
        assert store.count == len(model)
        assert store.get(topic) == model.get(topic)
    for topic_filter in filters:
        assert matched(store, topic_filter) == expected_matching(model, topic_filter)
    for topic in TOPICS_3:
        assert store.get(topic) == model.get(topic)
    assert list(dead_nodes(store._root)) == []
    for topic in list(model):
        store.delete(topic)
    assert store.count == 0
    assert store._root.children == {}


def test_retained_examples() -> None:
    store: RetainedStore[int] = RetainedStore()
    for value, topic in enumerate(["a", "a/b", "a/b/c", "$SYS/x", "$SYS", "/", "b//"]):
        store.set(topic, value)
    assert matched(store, "a/#") == {"a": 0, "a/b": 1, "a/b/c": 2}  # '#' takes the parent
    assert matched(store, "#") == {"a": 0, "a/b": 1, "a/b/c": 2, "/": 5, "b//": 6}
    assert matched(store, "+") == {"a": 0}
    assert matched(store, "+/+") == {"a/b": 1, "/": 5}
    assert matched(store, "+/#") == {"a": 0, "a/b": 1, "a/b/c": 2, "/": 5, "b//": 6}
    assert matched(store, "$SYS/#") == {"$SYS/x": 3, "$SYS": 4}
    assert matched(store, "$SYS/+") == {"$SYS/x": 3}
    assert matched(store, "b/+/") == {"b//": 6}
    assert matched(store, "a/b/c/#") == {"a/b/c": 2}
    assert matched(store, "x/#") == {}


def test_retained_set_overwrites_and_count() -> None:
    store: RetainedStore[str] = RetainedStore()
    assert store.count == 0
    assert store.get("a/b") is None
    store.set("a/b", "one")
    store.set("a/b", "two")
    assert store.count == 1
    assert store.get("a/b") == "two"
    assert list(store.matching("a/b")) == [("a/b", "two")]
    assert store.get("a") is None  # a branch on the way is not a retained topic
    assert store.get("a/b/c") is None


def test_retained_delete() -> None:
    """Deleting a topic leaves its descendants; deleting a missing topic or a branch is a no-op."""
    store: RetainedStore[int] = RetainedStore()
    store.set("a", 1)
    store.set("a/b/c", 2)
    store.delete("a/b")  # only a branch
    store.delete("x/y")
    store.delete("a/b/c/d")
    assert store.count == 2
    store.delete("a")
    assert store.count == 1
    assert store.get("a") is None
    assert dict(store.matching("#")) == {"a/b/c": 2}
    store.delete("a")  # again
    assert store.count == 1
    store.delete("a/b/c")
    assert store.count == 0
    assert store._root.children == {}
    assert list(store.matching("#")) == []


@pytest.mark.parametrize("value", [0, "", b""])
def test_retained_falsy_values_are_stored(value: object) -> None:
    """Only None means 'no retained message'; a falsy value is still one."""
    store: RetainedStore[object] = RetainedStore()
    store.set("a", value)
    assert store.count == 1
    assert list(store.matching("#")) == [("a", value)]
