"""Who gets a message: subscription and retained-message tries, with a per-topic route cache.

Pure data structures (no I/O, no policy). The rules of ``broker.topics`` hold here too: ``+`` fills
one level, ``#`` also matches the parent level, and a filter starting with a wildcard never
matches a topic starting with ``$``. ``tests/broker/test_broker_router.py`` checks both tries
against :func:`broker.topics.matches` on generated topics and filters.

Why tries: a fleet holds one filter per device (``devices/<id>/commands/#``) and one retained
``devices/<id>/state`` per device. Scanning every filter for each PUBLISH, or every retained
topic for each SUBSCRIBE, costs O(fleet) per operation and O(fleet^2) for a reconnect storm; a
trie walk costs O(levels). Delivery to the same topic repeats (telemetry), so the subscribers of
a topic are cached until the next subscription change.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["RetainedStore", "SubscriptionIndex"]

K = TypeVar("K")
V = TypeVar("V")

_ROUTE_CACHE_MAX = 8192


class _Node(Generic[K]):
    __slots__ = ("children", "members")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.members: dict[K, int] = {}


class SubscriptionIndex(Generic[K]):
    """Filter -> {subscriber: qos}; ``route(topic)``: each matching subscriber, its highest QoS."""

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._cache: dict[str, list[tuple[K, int]]] = {}
        self.filters = 0

    def add(self, topic_filter: str, key: K, qos: int) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if key not in node.members:
            self.filters += 1
        node.members[key] = qos
        self._cache.clear()

    def remove(self, topic_filter: str, key: K) -> bool:
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.members.pop(key, None) is None:
            return False
        self.filters -= 1
        self._cache.clear()
        # Prune empty branches so a churning fleet does not leave a trie of dead ids behind.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.members or child.children:
                break
            del parent.children[level]
        return True

    def route(self, topic: str) -> list[tuple[K, int]]:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: dict[K, int] = {}
        levels = topic.split("/")
        self._walk(self._root, levels, 0, found, topic.startswith("$"))
        result = list(found.items())
        if len(self._cache) >= _ROUTE_CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(
        self, node: _Node[K], levels: list[str], depth: int, found: dict[K, int], dollar: bool
    ) -> None:
        wild = not (dollar and depth == 0)
        if wild:
            hash_node = node.children.get("#")
            if hash_node is not None:
                _merge(found, hash_node.members)  # '#' matches this level and everything below
        if depth == len(levels):
            _merge(found, node.members)
            return
        child = node.children.get(levels[depth])
        if child is not None:
            self._walk(child, levels, depth + 1, found, dollar)
        if wild:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, depth + 1, found, dollar)


def _merge(found: dict[K, int], members: dict[K, int]) -> None:
    for key, qos in members.items():
        if found.get(key, -1) < qos:
            found[key] = qos


class _RNode(Generic[V]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _RNode[V]] = {}
        self.value: V | None = None


class RetainedStore(Generic[V]):
    """Topic -> the retained message; ``matching(filter)`` walks only the branches it can match."""

    def __init__(self) -> None:
        self._root: _RNode[V] = _RNode()
        self.count = 0

    def set(self, topic: str, value: V) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _RNode()
            node = child
        if node.value is None:
            self.count += 1
        node.value = value

    def get(self, topic: str) -> V | None:
        node: _RNode[V] | None = self._root
        for level in topic.split("/"):
            assert node is not None  # noqa: S101 - loop invariant
            node = node.children.get(level)
            if node is None:
                return None
        return node.value if node is not None else None

    def delete(self, topic: str) -> None:
        path: list[tuple[_RNode[V], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.value is None:
            return
        node.value = None
        self.count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.value is not None or child.children:
                break
            del parent.children[level]

    def matching(self, topic_filter: str) -> Iterator[tuple[str, V]]:
        yield from self._match(self._root, topic_filter.split("/"), 0, [])

    def _match(
        self, node: _RNode[V], levels: list[str], depth: int, path: list[str]
    ) -> Iterator[tuple[str, V]]:
        if depth == len(levels):
            if node.value is not None:
                yield "/".join(path), node.value
            return
        level = levels[depth]
        if level == "#":
            # '#' matches the parent too ('a/#' matches 'a'), but not at the root of '$' topics.
            if depth and node.value is not None:
                yield "/".join(path), node.value
            for name, child in node.children.items():
                if depth == 0 and name.startswith("$"):
                    continue
                yield from self._all(child, [*path, name])
            return
        if level == "+":
            for name, child in node.children.items():
                if depth == 0 and name.startswith("$"):
                    continue
                yield from self._match(child, levels, depth + 1, [*path, name])
            return
        exact = node.children.get(level)
        if exact is not None:
            yield from self._match(exact, levels, depth + 1, [*path, level])

    def _all(self, node: _RNode[V], path: list[str]) -> Iterator[tuple[str, V]]:
        if node.value is not None:
            yield "/".join(path), node.value
        for name, child in node.children.items():
            yield from self._all(child, [*path, name])
