"""The model registry: `@register("name")` on a `Model` subclass makes it a recipe `model.name`."""

from __future__ import annotations

from collections.abc import Callable

from vae_cli.core.registry import Registry
from vae_cli.models.base import Model

REGISTRY: Registry[type[Model]] = Registry("model", "model.name")


def register(name: str) -> Callable[[type[Model]], type[Model]]:
    def deco(cls: type[Model]) -> type[Model]:
        REGISTRY.add(name, cls)
        cls.registry_name = name
        return cls

    return deco
