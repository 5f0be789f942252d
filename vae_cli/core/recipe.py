"""Recipes: the typed, validated, frozen description of one training job.

A recipe is YAML with three sections (`data`, `model`, `train`) plus `name` and `seed`. Every key has a
default below, with its type and a one-line comment, Ultralytics-style: this file *is* the reference
(`vae info --defaults` prints it). Command-line overrides use dotted paths (`model.latent_dim=32`); a
bare key (`epochs=20`) works when exactly one section has it. Unknown keys, wrong types and
out-of-range values raise `RecipeError` with one line naming the key and, for a typo, the closest key.

This module must not import torch: `vae --help` and recipe checks stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae_cli.core.errors import RecipeError
from vae_cli.core.recipe_values import check_value, registry_of
from vae_cli.core.yamlsafe import safe_yaml


def key(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, exclusive_min: bool = False, registry: str | None = None) -> Any:
    """A recipe key: its default, a one-line help and optional choices/range, checked on load.
    `registry` ("package.module:NAME") names the `Registry` whose entries are the valid values."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min, "max": max,
                                            "exclusive_min": exclusive_min, "registry": registry})


@dataclass(frozen=True)
class DataConfig:
    name: str = key("digits", "dataset (digits is embedded in scikit-learn; folder is your own class folders)",
                    registry="vae_cli.data:DATASETS")
    root: str = key("data", "where datasets live (torchvision layout, e.g. <root>/MNIST/raw/*.gz)")
    download: bool = key(False, "download torchvision datasets into root when missing")
    image_size: int | None = key(None, "resize images to this square size (null: the dataset's own)", min=1)
    channels: int | None = key(None, "1 = grey, 3 = colour (null: the dataset's own)", choices=(1, 3, None))
    test_fraction: float = key(0.2, "held-out test share for datasets without a test split", min=0.0,
                               max=0.9, exclusive_min=True)
    labels_per_class: int | None = key(None, "labelled images per class, seeded and stratified "
                                             "(null: all labelled)", min=1)
    labeled_fraction: float | None = key(None, "labelled share of the training set, stratified "
                                               "(alternative to labels_per_class)", min=0.0, max=1.0,
                                         exclusive_min=True)
    train_limit: int | None = key(None, "use only the first N training images (quick experiments, tests)",
                                  min=1)
    memory_limit_gb: float = key(8.0, "folder datasets whose decoded float32 images would take more than this "
                                      "stream from disk through a DataLoader instead (0: always stream)", min=0.0)
    workers: int | None = key(None, "processes decoding image files ahead of training when a dataset streams "
                                    "(null: one fewer than the CPU cores, 1 to 4)", min=0, max=64)
    holdout_fraction: float = key(0.05, "share of the training split kept out of training (stratified, fixed) "
                                        "to calibrate `classify --reject` (0: none)", min=0.0, max=0.5)
    binarize: str = key("none", "none | threshold (x > 0.5 everywhere) | stochastic (each training batch a "
                                "fresh Bernoulli draw; test and held-out images one fixed draw)",
                        choices=("none", "threshold", "stochastic"))


@dataclass(frozen=True)
class ModelConfig:
    name: str = key("vae", "model family (see `vae info --models`)", registry="vae_cli.models:REGISTRY")
    backbone: str = key("small", "encoder/classifier network (vae_cli/models/nets.py says what each is)",
                        registry="vae_cli.models.nets:BACKBONES")
    decoder: str | None = key(None, "decoder network (null: same as backbone)",
                              registry="vae_cli.models.nets:BACKBONES")
    latent_dim: int = key(16, "size of the latent code z", min=1, max=4096)
    width: int = key(32, "channels of the first conv layer; doubles at each downsampling (conv backbones only)",
                     min=1, max=1024)
    hidden: int = key(256, "units of the fully connected layer between conv stack and latent", min=1)
    likelihood: str = key("bernoulli", "p(x|z) (bernoulli: logits, images in [0,1]; gaussian: learned scale; "
                                       "logistic / logistic_mixture: the probability of the 8-bit file)",
                          registry="vae_cli.models.likelihoods:LIKELIHOODS")
    mixtures: int = key(10, "logistic_mixture: components per pixel (PixelCNN++ uses 10)", min=1, max=64)
    latent_channels: int = key(8, "hvae, m2h: channels of each latent group (one z per pixel of its resolution)",
                               min=1, max=256)
    depth: int = key(2, "hvae, m2h: latent groups per resolution on the top-down path", min=1, max=32)
    decoder_width: int | None = key(None, "m2h: channels of the hierarchical decoder's ladder (null: model.width, "
                                          "which sizes the classifier's trunk)", min=1, max=1024)
    latent_levels: int = key(3, "hvae, m2h: resolutions that carry latent groups, the coarsest first (the image's own "
                                "resolution never does: the latents must summarise, not copy, the pixels)",
                             min=1, max=4)
    beta: float = key(1.0, "weight of the KL term (beta-VAE; 1 = the ELBO)", min=0.0)
    head_hidden: int = key(256, "hidden units of the classifier head (0: linear softmax)", min=0)
    alpha: float = key(1.0, "M2: weight of the labelled cross-entropy, per labelled image (Kingma et al. "
                            "2014 use 0.1 x N in summed units)", min=0.0)
    consistency: float = key(0.0, "M2: weight of the augmentation-consistency term on unlabelled images "
                                  "(0: off; FixMatch-style pseudo-labels)", min=0.0)
    threshold: float = key(0.95, "M2: confidence above which a prediction becomes a pseudo-label",
                           min=0.0, max=1.0)
    unlabelled_elbo_images: int | None = key(None, "M2: unlabelled images per step whose bound enumerates every "
                                                   "class and which the self-supervised tasks see (null: the "
                                                   "whole batch); the consistency term always sees the whole "
                                                   "batch. Caps the K-fold decoder cost", min=1)
    ladder_images: int | None = key(None, "m2h: labelled and unlabelled images per step, each, whose bound runs "
                                          "through the ladder (the first of the step's labelled draw and of its "
                                          "`unlabelled_elbo_images`; null: all of them). Caps the ladder's cost "
                                          "without changing what the classifier sees", min=1)
    strong_all: bool = key(False, "M2: run the consistency term's strong view on every unlabelled image (true) "
                                  "or only on those whose pseudo-label passed `model.threshold`, at least 64 "
                                  "(false: the same gradient for less work; batch norm sees fewer images)")
    align: bool = key(False, "M2: distribution alignment of the pseudo-labels (ReMixMatch): divide q(y|x) by "
                             "its running mean over unlabelled batches, against pseudo-label class imbalance")
    rotation: float = key(0.0, "M2: weight of a self-supervised rotation-prediction loss on the trunk (0: off; "
                               "Gidaris et al. 2018, S4L). Its head's log p(upright|x) joins --reject's "
                               "combined score (Hendrycks et al. 2019)", min=0.0)
    colour_order: float = key(0.0, "M2 on colour images: weight of a self-supervised task, which of the 6 orders "
                                   "of the RGB channels an image was given (0: off; Lee et al. 2020, SLA). Its "
                                   "head's log p(true colours|x) joins --reject's combined score: photos whose "
                                   "colours do not fit their content (swapped channels, negatives)", min=0.0)
    test_flip: bool = key(False, "predict from the image and its mirror image, class probabilities averaged "
                                 "(test-time flips): for models trained with train.augment_flip")
    dropout: float = key(0.3, "dropout in the classifier (M2's q(y|x), the VAE's M1 head when head_hidden > 0)",
                         min=0.0, max=0.95)
    iw_samples: int = key(5, "iwae: importance samples per image in the training bound (Burda et al. 2016)",
                          min=1, max=1024)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(30, "passes over the training set (with `minutes`: at most this many)", min=1)
    minutes: float = key(0.0, "a time budget for the training epochs: after each epoch the schedule's length is "
                              "re-planned from the epochs' measured times so the last one ends within it (0: off; "
                              "the run then depends on the machine's speed, see docs/DECISIONS.md)", min=0.0)
    batch_size: int = key(64, "images per optimisation step", min=1)
    labelled_batch_size: int = key(64, "labelled images drawn per step (semi-supervised models)", min=1)
    augment_shift: float = key(0.0, "random shift of up to this many pixels (0: off)", min=0.0)
    augment_rotate: float = key(0.0, "random rotation of up to this many degrees (0: off)", min=0.0, max=180.0)
    augment_flip: bool = key(False, "random horizontal flips (for colour photos, not digits)")
    augment_crop: bool = key(False, "shift by whole pixels with mirrored borders (a random crop) instead of "
                                    "sub-pixel shifts with zero borders, which blur every training image; "
                                    "only without augment_rotate")
    lr: float = key(2e-3, "AdamW learning rate (cosine decay to 5% of it)", min=0.0, exclusive_min=True)
    weight_decay: float = key(0.0, "AdamW weight decay", min=0.0)
    kl_warmup_epochs: int = key(5, "epochs over which the KL weight ramps linearly from 0 to beta", min=0)
    ema: float = key(0.0, "decay of an exponential moving average of the weights, used for the per-epoch test "
                          "numbers and as the saved model (0: off; 0.999 for runs of thousands of steps)", min=0.0,
                     max=0.99999)
    grad_clip: float = key(10.0, "clip the global gradient norm to this (0: off)", min=0.0)
    grad_skip: float = key(0.0, "skip an update whose gradient norm (before clipping) exceeds this (0: off; VDVAE's "
                                "guard against the rare huge KL gradients of deep hierarchies)", min=0.0)
    head_steps: int = key(600, "optimisation steps of the latent classifier after VAE training (models with an M1 "
                                "head: vae, iwae, hvae; the M2 family trains its classifier in the loop: 0)", min=0)
    device: str = key("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    precision: str = key("auto", "auto | fp32 | bf16 | fp16 (autocast; fp16 uses a GradScaler)",
                         choices=("auto", "fp32", "bf16", "fp16"))
    num_samples: int = key(64, "images in the sample grid written at the end", min=1, max=1024)
    latent_map: str = key("tsne", "latent-map.png projection: tsne (clusters; ~10 s for its 2,000 points on 2 "
                                  "cores) | pca (5,000 points, instant)", choices=("tsne", "pca"))
    channels_last: bool = key(True, "channels-last memory for conv nets (measured +24% images/s on CPU bf16)")
    fused_optimizer: bool = key(True, "fused AdamW kernel where torch has one (measured +9% on CPU)")
    compile: bool = key(False, "torch.compile the training step (pays a compile time up front; see BENCHMARKS.md)")
    eval_every: int = key(1, "test-subset numbers in metrics.csv every N epochs and on the last one (their time counts "
                             "against `minutes`: ~6 s an epoch for 2,000 CIFAR-10 images on 2 cores)", min=1)
    init: str = key("", "a model.safetensors to start from (`vae train --init`): every tensor whose name and shape "
                        "match is loaded, class rows matched by class name; the learning rate then warms up over "
                        "the first epoch and the KL warm-up is skipped when the generative part was loaded "
                        "(empty: random initialisation). Not --resume, which continues an interrupted run")
    shards: int = key(0, "on the CPU, each step's batch in this many shards, each computed on one thread and their "
                         "gradients added in order: the weights then do not depend on how many cores the run gets "
                         "(other vae jobs beside it) (0: the machine's cores, at most 8, at least 32 images each; "
                         "set it to get the same weights on machines with different cores)", min=0, max=64)
    checkpoint_every: int = key(0, "also write the resumable state every N steps (0: only each epoch)", min=0)
    reject_rate: float = key(0.01, "`classify --reject`: share of held-out training images that may be "
                                   "rejected; sets the likelihood threshold", min=0.0, max=0.5, exclusive_min=True)
    reject_score: str = key("combined", "`classify --reject` score (see `vae info --defaults`; docs in "
                                        "vae_cli/evaluation/reject.py)", registry="vae_cli.evaluation.reject:SCORES")
    reject_samples: int = key(16, "importance samples per image in the `--reject` score (IWAE bound)", min=1,
                              max=1024)
    loggers: tuple[str, ...] = key(("csv",), "where per-epoch numbers go besides metrics.csv (always written): a "
                                   "list of csv, tensorboard (run folder's tensorboard/), mlflow (MLFLOW_TRACKING_URI "
                                   "or ./mlruns); the last two need pip install 'vae-cli[tensorboard]' / "
                                   "'vae-cli[mlflow]'", choices=("csv", "tensorboard", "mlflow"))
    skip_nonfinite: bool = key(False, "skip batches whose loss is NaN/inf instead of stopping the run")


@dataclass(frozen=True)
class Recipe:
    name: str | None = key(None, "run name (default: the recipe file's name)")
    seed: int = key(0, "seed for weights, data order and the labelled subset", min=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self, dict_factory=lambda kv: {k: list(v) if isinstance(v, tuple) else v
                                                                 for k, v in kv})

    def replace(self, **overrides: Any) -> Recipe:
        """A validated copy with dotted-key overrides (`recipe.replace(**{"train.epochs": 3})`)."""
        return from_dict(set_keys(self.to_dict(), overrides.items()))


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_of(dotted: str) -> dataclasses.Field:
    """The schema field of a dotted key (`model.latent_dim`), with its default and metadata."""
    section, _, name = dotted.rpartition(".")
    return fields_of(SECTIONS[section] if section else Recipe)[name]


def all_keys() -> list[str]:
    """Every dotted key a recipe accepts, in schema order."""
    keys = [n for n in fields_of(Recipe) if n not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{n}" for n in fields_of(cls)]
    return keys


def _suggest(bad: str) -> str:
    """'; did you mean X?' for the closest key, section or bare key name, else the list of keys. A dotted
    key (`train.zzz`) is matched against keys only, never against a bare section name."""
    keys = all_keys()
    by_name: dict[str, str] = {}
    for k in keys + ([] if "." in bad else list(SECTIONS)):
        by_name.setdefault(k, k)
        by_name.setdefault(k.split(".")[-1], k)
    for probe in (bad, bad.split(".")[-1]):
        match = difflib.get_close_matches(probe, list(by_name), n=1, cutoff=0.6)
        if match:
            return f"; did you mean '{by_name[match[0]]}'?"
    return f"; valid keys: {', '.join(keys)}"


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = f"section '{prefix.rstrip('.')}'" if prefix else "a recipe"
        raise RecipeError(f"{where} must be a mapping of key: value, got {type(raw).__name__}")
    fields = fields_of(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in raw.items():
        dotted = f"{prefix}{k}"
        if not isinstance(k, str) or k not in fields:
            raise RecipeError(f"unknown recipe key '{dotted}'{_suggest(str(dotted))}")
        if k in SECTIONS and cls is Recipe:
            kwargs[k] = _build(SECTIONS[k], v, f"{k}.")
        else:
            kwargs[k] = check_value(dotted, v, hints[k], fields[k].metadata)
    return cls(**kwargs)


def from_dict(raw: Any) -> Recipe:
    """A validated `Recipe` from parsed YAML: every key and value checked (`_build`), then the rules across
    keys (`core/recipe_rules.py`: keys the chosen model does not read, keys that exclude each other)."""
    from vae_cli.core.recipe_rules import check  # the rules read this module's schema

    recipe = _build(Recipe, raw, "")
    check(recipe)
    return recipe


def all_keys_of(section: str) -> list[str]:
    return [k for k in all_keys() if k.startswith(section + ".")]


def resolve_key(k: str) -> str:
    """Map an override key to its dotted form; a bare key must name exactly one field."""
    if k in all_keys():
        return k
    owners = [d for d in all_keys() if d.split(".")[-1] == k]
    if len(owners) == 1:
        return owners[0]
    if k in SECTIONS:
        raise RecipeError(f"'{k}' is a section; override its keys one by one (e.g. {all_keys_of(k)[0]}=...)")
    if len(owners) > 1:
        raise RecipeError(f"override key '{k}' is ambiguous: write one of {', '.join(owners)}")
    raise RecipeError(f"unknown recipe key '{k}'{_suggest(k)}")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Split `key=value` strings; values are read as YAML scalars (`null`, `true`, `32`, `0.5`)."""
    pairs = []
    for item in overrides:
        k, sep, text = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise RecipeError(f"override '{item}' is not key=value (example: model.latent_dim=32)")
        try:
            value = safe_yaml(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError):
            value = text
        pairs.append((k, value))
    return pairs


def set_keys(raw: dict[str, Any], pairs: Any) -> dict[str, Any]:
    """A copy of a raw recipe dict with (key, value) pairs set; keys dotted or bare."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for k, value in pairs:
        dotted = resolve_key(k)
        if "." in dotted:
            section, name = dotted.split(".", 1)
            if out.get(section) is None:
                out[section] = {}
            if not isinstance(out[section], dict):
                raise RecipeError(f"section '{section}' must be a mapping of key: value")
            out[section][name] = value
        else:
            out[dotted] = value
    return out


def load(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults when `path` is None) and apply overrides."""
    raw: Any = {}
    if path is not None:
        from vae_cli.core import builtin

        p = builtin.resolve(path)
        if not p.is_file():
            raise RecipeError(f"recipe '{p}' not found: give a .yaml file or a shipped recipe's name "
                              f"({', '.join(builtin.names())})")
        try:
            raw = safe_yaml(p.read_text(encoding="utf-8"))
        except RecursionError:
            raise RecipeError(f"recipe '{p}' is nested too deeply; a recipe is three sections of key: value") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "malformed YAML"
            raise RecipeError(f"recipe '{p}' is not valid YAML{where}: {problem}") from None
        except UnicodeDecodeError:
            raise RecipeError(f"recipe '{p}' is not UTF-8 text (is it a YAML file?)") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RecipeError(f"recipe '{p}' must be a mapping with sections data/model/train, "
                              f"got {type(raw).__name__}")
        if raw.get("name") is None:
            raw = {**raw, "name": p.stem}
    return from_dict(set_keys(raw, parse_overrides(list(overrides))))


def defaults_yaml() -> str:
    """The defaults as commented YAML: the reference a user copies from."""
    lines = []

    def emit(cls: type, indent: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS and cls is Recipe:
                continue
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            tname = str(hints[f.name]).replace("<class '", "").replace("'>", "").replace("NoneType", "None")
            tname = "list of str" if tname == "tuple[str, ...]" else tname
            names = f" [{' | '.join(registry_of(f.metadata['registry']).names())}]" if f.metadata["registry"] else ""
            lines.append(f"{indent}{f.name}: {value}  # ({tname}) {f.metadata['help']}{names}")

    emit(Recipe, "")
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        emit(cls, "  ")
    return "\n".join(lines) + "\n"
