"""`vae train RECIPE --init WEIGHTS` (`train.init`): a new run that starts from another model's weights
(issue 31), for nightly retraining on a grown folder, a changed class list or more labels, and for carrying
an unsupervised model into few-label training of the same shape.

Every tensor of the weights file whose name and shape match the new model's is loaded (a model that wraps
another, as `m2h` wraps the `hvae` ladder as `gen.`, also finds that model's tensors without the prefix); the
rest keep their fresh initialisation. Tensors indexed by class (a classifier's output rows, the one-hot inputs of M2's
class-conditioned layers, the M1 head's class statistics) are matched by class *name*: an old class keeps its
row wherever it now sits, a new class gets a fresh row, a removed one is dropped. Which axis of which tensor
is a class axis is not declared anywhere: the model is built once with K and once with K+1 classes, and an
axis that grows by one is a class axis, its class slots the last K entries (the models concatenate the
one-hot class after their features). A file that matches too little (another architecture, image size or
channels) is refused, naming the key.

`--init` is not `--resume`: `--resume` continues an interrupted run from its `last.safetensors` (the same
recipe, its optimizer, schedule and data order); `--init` starts a new run, with its own schedule, from a
finished model's `model.safetensors`. What changes in the schedule (engine/loop.py): the learning rate warms
up over the first epoch, the EMA starts from the loaded weights, and the KL warm-up is skipped when the
generative part was loaded (it already balances its terms); finish() calibrates `--reject` on the new run's
held-out images as for any run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vae_cli.artifacts import checkpoint
from vae_cli.core.errors import CheckpointError, RecipeError
from vae_cli.engine import state

MIN_SHARE = 0.5  # refuse a file that provides less than this share of the new model's tensors and of its weights
WARM_SHARE = 0.85  # the KL warm-up is skipped when at least this share of the tensors was loaded (the
# hierarchical VAE's file gives m2h all of its ladder but its class input: 89% of its tensors on small photos)


@dataclass
class InitReport:
    weights: str
    loaded: int  # tensors loaded (those indexed by class: at least one class's slot, or the rest of the tensor)
    new: int  # tensors of the new model the file has nothing for: freshly initialised
    dropped: int  # tensors of the file the new model has no use for
    share: float  # share of the new model's weights (elements) that came from the file
    tensor_share: float = 0.0  # share of the new model's tensors loaded (wholly or some class slots)
    classes_kept: list[str] = field(default_factory=list)
    classes_added: list[str] = field(default_factory=list)
    classes_removed: list[str] = field(default_factory=list)

    @property
    def warm(self) -> bool:
        return self.tensor_share >= WARM_SHARE

    def describe(self) -> str:
        classes = (f"; classes: {len(self.classes_kept)} kept, {len(self.classes_added)} new"
                   f"{' (' + ', '.join(self.classes_added[:5]) + ')' if self.classes_added else ''}, "
                   f"{len(self.classes_removed)} dropped")
        return (f"init from {self.weights}: {self.loaded} tensors loaded ({self.share:.0%} of the weights), "
                f"{self.new} newly initialised, {self.dropped} dropped{classes}")

    def as_dict(self) -> dict:
        return {**asdict(self), "warm": self.warm}


def class_axes(build, num_classes: int, names: list[str]) -> dict[str, int | None]:
    """{tensor name: its class axis, or None when it depends on the number of classes in a way that cannot be
    mapped}, for the tensors whose shape depends on it; `build(k)` makes the model with k classes."""
    with torch.random.fork_rng(devices=[]):  # building consumes random numbers: not the run's
        small, big = build(num_classes).state_dict(), build(num_classes + 1).state_dict()
    axes: dict[str, int | None] = {}
    for name in names:
        a, b = small[name].shape, big[name].shape
        if a == b:
            continue
        grew = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        axes[name] = grew[0] if len(a) == len(b) and len(grew) == 1 and b[grew[0]] == a[grew[0]] + 1 else None
    return axes


def _is_state(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == state.FORMAT
    except Exception:  # noqa: BLE001  (not a safetensors file at all: read_metadata's message says so)
        return False


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights file's tensors (without the --reject reference) and metadata, or one clear error."""
    from safetensors.torch import load_file

    try:
        meta = checkpoint.read_metadata(path)
    except CheckpointError as e:
        if path.is_file() and _is_state(path):
            raise RecipeError(f"train.init: '{path}' is a training state (last.safetensors), which --resume "
                              f"continues; --init (train.init) takes a finished model's model.safetensors") from None
        raise CheckpointError(f"train.init: {e}") from None
    tensors = load_file(str(path))
    tensors.pop(checkpoint.REJECT_REFERENCE, None)
    return tensors, meta


def warm_start(model: torch.nn.Module, path: str | Path, classes: list[str], build) -> InitReport:
    """Load what fits of the weights file `path` into `model` (built for `classes`); `build(k)` builds the
    same model for k classes (to find the class axes). Refuses a file that matches too little."""
    path = Path(path)
    tensors, meta = _read(path)
    old = list(meta["classes"])
    own = model.state_dict()
    axes = class_axes(build, len(classes), list(own))
    where = {c: i for i, c in enumerate(old)}
    report = InitReport(str(path), 0, 0, 0, 0.0, classes_kept=[c for c in classes if c in where],
                        classes_added=[c for c in classes if c not in where],
                        classes_removed=[c for c in old if c not in set(classes)])
    total, taken, out = 0, 0, {}
    used: set[str] = set()
    for name, t in own.items():
        total += t.numel()
        src_name = _source_name(name, tensors)
        src = tensors.get(src_name) if src_name else None
        if src is not None and name in axes and axes[name] is not None:
            got, n = _map_classes(t, src, axes[name], classes, old, where)
        elif src is not None and src.shape == t.shape:
            got, n = src.to(t.dtype), t.numel()
        else:
            got, n = t, 0
        out[name] = got
        taken += n
        if n:
            used.add(src_name)
        report.loaded += n > 0
        report.new += n == 0
    report.share = taken / max(1, total)
    report.tensor_share = report.loaded / max(1, len(own))
    report.dropped = len(set(tensors) - used)
    if max(report.share, report.tensor_share) < MIN_SHARE:
        raise RecipeError(f"train.init: '{path}' provides only {report.share:.0%} of this model's weights (its "
                          f"model '{meta['model']}', {meta['image_shape']} images; {report.loaded} of "
                          f"{len(own)} tensors match): another architecture, image size or channels; init "
                          f"from a model trained with the same model.* keys and image shape")
    model.load_state_dict(out)
    return report


def _source_name(name: str, tensors: dict) -> str | None:
    """The file's tensor for the model's `name`: the same name, else the model's name without its leading
    modules (`gen.blocks.0.w` <- `blocks.0.w`: a model that wraps another, as `m2h` wraps the `hvae` ladder,
    starts from that model's file)."""
    parts = name.split(".")
    for k in range(len(parts)):
        if ".".join(parts[k:]) in tensors:
            return ".".join(parts[k:])
    return None


def _map_classes(t: torch.Tensor, src: torch.Tensor, axis: int, classes: list[str], old: list[str],
                 where: dict[str, int]) -> tuple[torch.Tensor, int]:
    """`t` with the old file's slots copied in by class name along `axis` (the class slots are the last ones),
    and how many elements came from the file."""
    off_new, off_old = t.shape[axis] - len(classes), src.shape[axis] - len(old)
    rest_new, rest_old = list(t.shape), list(src.shape)
    rest_new[axis], rest_old[axis] = off_new, off_old
    if off_new < 0 or rest_new != rest_old:
        return t, 0
    out = t.clone()
    out.narrow(axis, 0, off_new).copy_(src.narrow(axis, 0, off_old))
    n = out.narrow(axis, 0, off_new).numel()
    for j, c in enumerate(classes):
        if c in where:
            out.select(axis, off_new + j).copy_(src.select(axis, off_old + where[c]))
            n += out.select(axis, off_new + j).numel()
    return out, n
