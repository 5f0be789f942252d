"""Rules across recipe keys, checked once every key and value is valid (`recipe.from_dict`): a key the chosen
model (or its backbone) does not read is refused, never silently ignored (pythae's per-model configs refuse
it the same way), and keys that exclude each other are refused together, each in one line naming the fix.
"""

from __future__ import annotations

import dataclasses

from vae_cli.core.errors import RecipeError
from vae_cli.core.recipe import ModelConfig, Recipe, TrainConfig, fields_of
from vae_cli.core.recipe_values import registry_of


def check(recipe: Recipe) -> None:
    if recipe.data.labels_per_class is not None and recipe.data.labeled_fraction is not None:
        raise RecipeError("set only one of 'data.labels_per_class' and 'data.labeled_fraction' "
                          "(remove the other, or set it to null)")
    m = recipe.model
    _refuse_unread_model_keys(m)
    _refuse_unread_head_steps(recipe)
    nets = registry_of(fields_of(ModelConfig)["backbone"].metadata["registry"])
    if m.width != ModelConfig.width and not any(nets.get(n).uses_width for n in {m.backbone, m.decoder or m.backbone}):
        raise RecipeError(f"model.width={m.width} does not apply to the {m.backbone} backbone (it has no channels); "
                          f"size it with model.hidden, or remove model.width")
    if recipe.train.augment_crop and recipe.train.augment_rotate:
        raise RecipeError("train.augment_crop shifts by whole pixels and cannot rotate; set train.augment_rotate=0 "
                          "or train.augment_crop=false")
    if recipe.train.augment_crop and recipe.train.augment_shift != int(recipe.train.augment_shift):
        raise RecipeError(f"train.augment_crop shifts by whole pixels; set train.augment_shift to a whole number "
                          f"(not {recipe.train.augment_shift:g}) or train.augment_crop=false")


def model_keys(name: str) -> list[str]:
    """The `model.*` keys model `name` reads (its class's `reads`), in schema order."""
    reads = set(registry_of(fields_of(ModelConfig)["name"].metadata["registry"]).get(name).reads) | {"name"}
    return [f for f in fields_of(ModelConfig) if f in reads]


def _refuse_unread_model_keys(m: ModelConfig) -> None:
    """A key the chosen model does not read, set to anything but its default, is a mistake the run would hide
    (pythae's per-model configs refuse it the same way)."""
    reads = set(model_keys(m.name))
    if m.likelihood != "logistic_mixture":
        reads.discard("mixtures")
    nets = registry_of(fields_of(ModelConfig)["backbone"].metadata["registry"])
    parts = [(m.backbone, "encoder")] + ([(m.decoder or m.backbone, "decoder")] if "decoder" in reads else [])
    model_cls = registry_of(fields_of(ModelConfig)["name"].metadata["registry"]).get(m.name)
    unread_by_nets = {k for k in getattr(model_cls, "via_backbone", ())
                      if not any(getattr(nets.get(n), f"{part}_{k}", True) for n, part in parts)}
    reads -= unread_by_nets
    for f in dataclasses.fields(ModelConfig):
        if f.name not in reads and getattr(m, f.name) != f.default:
            why = ("model.mixtures is read only by model.likelihood=logistic_mixture" if f.name == "mixtures"
                   else f"neither the {m.backbone} encoder nor the {m.decoder or m.backbone} decoder has a layer "
                        f"model.{f.name} sizes" if f.name in unread_by_nets
                   else f"model '{m.name}' does not read model.{f.name} (it reads "
                        f"{', '.join(sorted(reads - {'name'}))})")
            fix = "a backbone or decoder that has one" if f.name in unread_by_nets else "a model that reads it"
            raise RecipeError(f"{why}; remove model.{f.name}={getattr(m, f.name)!r} or pick {fix}")


def _refuse_unread_head_steps(recipe: Recipe) -> None:
    """`train.head_steps` is read only by models that fit a classifier after the loop (`fits_head`: the M1
    head); for the others 0 says what they do anyway, any other value (but the default) would be ignored."""
    model_cls = registry_of(fields_of(ModelConfig)["name"].metadata["registry"]).get(recipe.model.name)
    steps = recipe.train.head_steps
    if not model_cls.fits_head and steps not in (0, fields_of(TrainConfig)["head_steps"].default):
        raise RecipeError(f"model '{recipe.model.name}' trains its classifier in the main loop and does not read "
                          f"train.head_steps; remove train.head_steps={steps} (or set it to 0)")
