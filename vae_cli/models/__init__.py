"""The model registry: `@register("name")` on a `Model` subclass makes it a recipe `model.name`.

    model = build_model(recipe.model, image_shape=(1, 28, 28), num_classes=10)

Every registered model is tested by tests/test_models.py (shapes, finite loss, backward, round trip).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from vae_cli.errors import RecipeError
from vae_cli.models.base import Model

REGISTRY: dict[str, type[Model]] = {}


def register(name: str) -> Callable[[type[Model]], type[Model]]:
    def deco(cls: type[Model]) -> type[Model]:
        if name in REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        cls.registry_name = name
        REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(REGISTRY)


def build_model(cfg, image_shape: tuple[int, int, int], num_classes: int) -> Model:
    try:
        cls = REGISTRY[cfg.name]
    except KeyError:
        close = difflib.get_close_matches(cfg.name, available(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(available())}"
        raise RecipeError(f"unknown model 'model.name={cfg.name}'; {hint}") from None
    return cls(cfg, tuple(image_shape), num_classes)


# Importing a model module registers it.
from vae_cli.models import m1m2, m2, vae  # noqa: E402,F401
