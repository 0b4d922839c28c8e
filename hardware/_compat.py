"""The few CPython conveniences the device-side modules use, made to work under MicroPython too.

The device side (``codec``, ``messages``, ``responder``, ``store``, ``keygen``, ``errors``) runs
unchanged under CPython and under MicroPython (the unix port in CI, a board in the field). Those
modules stay fully typed for mypy; what MicroPython lacks is bridged here, in one place:

* ``typing``: not imported at run time at all. A module writes ``TYPE_CHECKING = False`` (or
  imports it from here) and guards type-only imports with ``if TYPE_CHECKING:``; mypy treats any
  name ``TYPE_CHECKING`` as true. Annotations that name such imports, or a class inside its own
  body, are quoted, because without ``from __future__ import annotations`` (MicroPython has no
  ``__future__``) CPython evaluates them when the function is defined. MicroPython never
  evaluates annotations.
* ``enum.IntEnum``: the real one on CPython. On MicroPython members are plain ints,
  ``Kind(value)`` returns the int or raises ``ValueError``, and ``members``/``member_name`` (use
  them instead of ``tuple(Kind)`` and ``Kind(v).name``) scan the class.
* ``dataclasses``: the real one on CPython. MicroPython keeps no annotations, so the fields cannot
  be discovered; every device dataclass therefore spells its field order in ``__match_args__``
  (which CPython's ``dataclass`` then leaves as written: the same tuple it would generate; a test
  checks they agree). The stand-in builds ``__init__`` (positional and keyword, defaults,
  ``field(default_factory=...)``, ``__post_init__``), ``__repr__``, ``__eq__`` and, for
  ``frozen=True``, a ``__setattr__`` that refuses.
* ``struct.Struct``: MicroPython's ``struct`` has only the functions; a small class wraps them.
* ``typing.Protocol``: ``object`` on MicroPython.

Other MicroPython differences the device code handles where they occur: no ``os.open``/
``os.fsync``/``os.chmod`` (``store``), no ``bytearray.clear`` and no ``{**a, **b}`` displays
(``codec``, ``responder``), one built-in exception base per class (``errors``).
"""

import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _E = TypeVar("_E", bound="IntEnum")
    _T = TypeVar("_T")

__all__ = [
    "MICROPYTHON",
    "TYPE_CHECKING",
    "IntEnum",
    "Protocol",
    "Struct",
    "dataclass",
    "field",
    "member_name",
    "members",
]

MICROPYTHON = sys.implementation.name == "micropython"


# -- the MicroPython stand-ins (plain classes: CPython never instantiates them) ------------------


class _MiniIntEnum:
    """``IntEnum`` for MicroPython: members stay plain ints; calling the class looks one up."""

    def __new__(cls, value: int) -> int:  # type: ignore[misc] # a member is a plain int
        for member in _mini_members(cls):
            if member == value:
                return member
        msg = f"{value!r} is not a valid {cls.__name__}"
        raise ValueError(msg)


def _mini_items(cls: type) -> "list[tuple[int, str]]":
    found = [
        (value, name)
        for name, value in cls.__dict__.items()
        if not name.startswith("_") and isinstance(value, int)
    ]
    # Sorted by value: MicroPython's class dict has no guaranteed order, and every enum here is
    # declared in value order anyway (CPython iterates in declaration order).
    found.sort()
    return found


def _mini_members(cls: type) -> "list[int]":
    return [value for value, _ in _mini_items(cls)]


class _MiniField:
    """What ``field(default_factory=...)`` returns under MicroPython."""

    def __init__(self, default_factory: "Callable[[], object]") -> None:
        self.default_factory = default_factory


def _mini_field(*, default_factory: "Callable[[], object]") -> _MiniField:
    return _MiniField(default_factory)


_MISSING = object()


def _mini_dataclass(
    cls: "type[_T] | None" = None, *, frozen: bool = False, **_options: object
) -> object:
    """``dataclass`` for MicroPython, driven by ``__match_args__`` (see the module docstring)."""

    def wrap(cls: "type[_T]") -> "type[_T]":
        names: tuple[str, ...] = cls.__dict__["__match_args__"]
        defaults = [cls.__dict__.get(name, _MISSING) for name in names]

        def __init__(self: object, *args: object, **kwargs: object) -> None:  # noqa: N807
            if len(args) > len(names):
                msg = f"{cls.__name__}() takes {len(names)} arguments, got {len(args)}"
                raise TypeError(msg)
            for i, name in enumerate(names):
                if i < len(args):
                    value = args[i]
                elif name in kwargs:
                    value = kwargs.pop(name)
                else:
                    default = defaults[i]
                    if default is _MISSING:
                        msg = f"{cls.__name__}() missing argument {name!r}"
                        raise TypeError(msg)
                    if isinstance(default, _MiniField):
                        value = default.default_factory()
                    else:
                        value = default
                object.__setattr__(self, name, value)
            if kwargs:
                msg = f"{cls.__name__}() got unexpected arguments {sorted(kwargs)}"
                raise TypeError(msg)
            post_init = getattr(self, "__post_init__", None)
            if post_init is not None:
                post_init()

        def __repr__(self: object) -> str:  # noqa: N807
            parts = [name + "=" + repr(getattr(self, name)) for name in names]
            return cls.__name__ + "(" + ", ".join(parts) + ")"

        def __eq__(self: object, other: object) -> bool:  # noqa: N807
            if type(other) is not type(self):
                return False
            return all(getattr(self, name) == getattr(other, name) for name in names)

        def __setattr__(self: object, name: str, value: object) -> None:  # noqa: N807
            msg = f"cannot assign to field {name!r} of a frozen {cls.__name__}"
            raise AttributeError(msg)

        setattr(cls, "__init__", __init__)  # noqa: B010 - a plain assignment upsets mypy
        setattr(cls, "__repr__", __repr__)  # noqa: B010
        setattr(cls, "__eq__", __eq__)  # noqa: B010
        if frozen:
            setattr(cls, "__setattr__", __setattr__)  # noqa: B010
        return cls

    return wrap if cls is None else wrap(cls)


class _MiniStruct:
    """``struct.Struct`` for MicroPython, whose ``struct`` module has only the functions."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.size: int = struct.calcsize(fmt)

    def pack(self, *values: object) -> bytes:
        return struct.pack(self.format, *values)

    def unpack(self, buffer: bytes) -> "tuple[Any, ...]":
        if len(buffer) != self.size:
            msg = f"unpack requires a buffer of {self.size} bytes"
            raise ValueError(msg)
        return struct.unpack(self.format, buffer)

    def unpack_from(self, buffer: bytes, offset: int = 0) -> "tuple[Any, ...]":
        if len(buffer) < offset + self.size:
            msg = f"unpack_from requires a buffer of at least {offset + self.size} bytes"
            raise ValueError(msg)
        return struct.unpack_from(self.format, buffer, offset)


# -- what the device modules import -------------------------------------------------------------

if TYPE_CHECKING:
    from dataclasses import dataclass, field
    from enum import IntEnum
    from struct import Struct
    from typing import Protocol
else:
    try:
        from enum import IntEnum
    except ImportError:
        IntEnum = _MiniIntEnum
    try:
        from dataclasses import dataclass, field
    except ImportError:
        dataclass = _mini_dataclass
        field = _mini_field
    Struct = getattr(struct, "Struct", _MiniStruct)
    try:
        from typing import Protocol
    except ImportError:
        Protocol = object


def members(cls: "type[_E]") -> "tuple[_E, ...]":
    """``tuple(cls)``: every member of an ``IntEnum``, in declaration order."""
    if issubclass(cls, _MiniIntEnum):
        return tuple(_mini_members(cls))  # ints stand in for the members
    return tuple(cls)


def member_name(cls: "type[IntEnum]", value: int) -> "str | None":
    """``cls(value).name``, or ``None`` when ``value`` is not a member."""
    if issubclass(cls, _MiniIntEnum):
        for member, name in _mini_items(cls):
            if member == value:
                return name
        return None
    try:
        return cls(value).name
    except ValueError:
        return None
