"""A tiny decorator registry shared by heads, balancers and task kinds (one pattern, one place)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class registry with a decorator, filtered listing and helpful lookup errors.

    Example:
        >>> reg: Registry[type] = Registry("widget")
        >>> @reg.register("plain")
        ... class Plain: ...
        >>> reg.list()
        ['plain']
        >>> reg.get("plain") is Plain
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}.")

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered ({self._entries[name]!r}). "
                    f"Pick another name; registered: {self.list()}."
                )
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def list(self, filter: str | None = None) -> list[str]:
        names = sorted(self._entries)
        return [n for n in names if filter is None or fnmatch.fnmatch(n, filter)]

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {self.list()}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries
