"""Name -> factory registries. An unknown name is a ValueError that lists the valid names."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A small ordered mapping from public names to factories, with a one-line description each."""

    def __init__(self, kind: str, fixed: tuple = ()):
        """``fixed``: constructor arguments the model always supplies (not user options)."""
        self.kind = kind
        self.fixed = tuple(fixed)
        self._items: Dict[str, T] = {}
        self._docs: Dict[str, str] = {}
        self._checks: Dict[str, Callable[..., Any]] = {}
        self._sizes: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str, doc: str = "", check: Optional[Callable[..., Any]] = None,
                 size: Optional[Callable[..., Any]] = None) -> Callable[[T], T]:
        """``check``: called with every user option (defaults filled in) to check their values without
        building anything (see :meth:`check_values`); the factory should call it too. ``size`` (data
        sources): called the same way, returns the items' spatial size (H, W[, D]), or None where only
        the data can tell (see :meth:`item_size`)."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            if check is not None:
                self._checks[name] = check
            if size is not None:
                self._sizes[name] = size
            lines = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._docs[name] = doc or (lines[0] if lines else "")
            return obj
        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._items)}")
        return self._items[name]

    def build(self, name: str, options: Optional[dict] = None, **fixed: Any):
        """Instantiate ``name`` with the ``fixed`` arguments the caller always passes plus user
        ``options``; an option the entry does not take is an error, never silently dropped."""
        factory = self.get(name)
        self.check_options(name, options)
        return factory(**fixed, **(options or {}))

    def check_options(self, name: str, options: Optional[dict]) -> None:
        """ValueError naming the valid options when ``options`` holds one ``name`` does not take."""
        accepted = list(self.options(name))
        unknown = sorted(set(options or {}) - set(accepted))
        if unknown:
            raise ValueError(f"{self.kind} {name!r} does not take option(s) {unknown}; "
                             f"valid: {accepted or 'none'}")
        defaults = self.options(name)
        for key, value in (options or {}).items():  # a switch is a switch: "maybe" or 5 is not "on"
            if isinstance(defaults[key], bool) and not isinstance(value, bool):
                raise ValueError(f"{self.kind} {name!r} option {key}={value!r}; expected true or false")

    def check_values(self, name: str, options: Optional[dict]) -> None:
        """The option names, then their values through the entry's ``check`` if it has one: what can be
        refused before anything is built or read (a config's validation)."""
        self.check_options(name, options)
        check = self._checks.get(name)
        if check is not None:
            check(**{**self.options(name), **(options or {})})

    def item_size(self, name: str, options: Optional[dict]) -> Optional[tuple]:
        """The spatial size of what ``name`` yields with ``options``, known without reading data, or None."""
        size = self._sizes.get(name)
        return None if size is None else size(**{**self.options(name), **(options or {})})

    def options(self, name: str) -> dict:
        """The user options of ``name`` with their defaults (for ``vitlab list``)."""
        params = inspect.signature(self.get(name)).parameters
        return {p: v.default for p, v in params.items()
                if v.kind == inspect.Parameter.KEYWORD_ONLY and p not in self.fixed}

    def doc(self, name: str) -> str:
        return self._docs[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
