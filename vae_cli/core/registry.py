"""One registry helper for every pluggable name a recipe can hold (models, datasets, backbones,
likelihoods), timm-style: `@REG.register("name")` adds an entry, a second entry under the same name is a
programming error, and an unknown name is one `RecipeError` line with the closest registered name.

    MODELS = Registry("model", "model.name")

    @MODELS.register("vae")
    class VAE(Model): ...

    MODELS.get("vea")  # RecipeError: unknown model 'model.name=vea'; did you mean 'vae'?

Help texts, `vae info --models` and error messages list `names()`, so nothing is written twice.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from vae_cli.core.errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind  # what an entry is, for messages ("model", "dataset", ...)
        self.key = key  # the recipe key that names an entry ("model.name")
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RecipeError(self.unknown(name)) from None

    def unknown(self, name: object, option: str | None = None) -> str:
        """The one-line message for a name that is not registered, with the closest one if any; `option`
        names a command-line option to blame instead of the recipe key."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = f"{option} {name}" if option else f"{self.key}={name}"
        return f"unknown {self.kind} '{where}': must be one of {', '.join(self.names())}{hint}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
