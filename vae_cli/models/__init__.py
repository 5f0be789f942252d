"""Models, their networks, likelihoods and loss functions. A new model is one module here with
`@register("name")` and one import line below; every registered model is walked by tests/test_models.py.

    model = build_model(recipe.model, image_shape=(1, 28, 28), num_classes=10)
"""

from __future__ import annotations

from vae_cli.models.base import Model
from vae_cli.models.registry import REGISTRY, register

__all__ = ["REGISTRY", "Model", "available", "build_model", "register"]


def available() -> list[str]:
    return REGISTRY.names()


def build_model(cfg, image_shape: tuple[int, int, int], num_classes: int) -> Model:
    return REGISTRY.get(cfg.name)(cfg, tuple(image_shape), num_classes)


# Importing a model module registers it.
from vae_cli.models import hvae, m1m2, m2, m2h, vae  # noqa: E402,F401
