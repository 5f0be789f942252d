"""The resumable training state, `last.safetensors`: everything needed to continue a run bit for bit.

One file, written atomically, so the weights and the optimizer can never be from different steps:
  tensors   model.<name>            model state dict
            optim.<i>.<key>         AdamW per-parameter state (exp_avg, exp_avg_sq, step)
            rng.torch, rng.data     global torch RNG (dropout, noise, augmentation) and data-order generator
            rng.torch.<rank>        each process's global RNG, under torchrun
            rng.cuda                CUDA RNG state of the current device, when training on a GPU
            perm                    the current epoch's shuffled order
            ema.<name>              the weights' moving average (train.ema > 0)
  metadata  format, recipe, optim (param groups and non-tensor state), sched, scaler, progress (epoch,
            step, partial sums, metrics rows so far), all JSON.
Tensors go through safetensors; nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vae_cli.core.errors import CheckpointError, RecipeError
from vae_cli.core.recipe import from_dict

FORMAT = "vae-cli-state/1"


@dataclass
class Progress:
    epoch: int = 1  # the epoch in progress (1-based)
    step_in_epoch: int = 0  # optimisation steps already done in this epoch
    order_drawn: bool = False  # this epoch's data order is drawn (and saved as `perm`)
    step: int = 0  # steps done in total
    sums: dict[str, float] = field(default_factory=dict)  # this epoch's running loss sums
    rows: list[dict] = field(default_factory=list)  # metrics rows of finished epochs
    epoch_seconds: float = 0.0
    spent_seconds: float = 0.0  # finished epochs' wall time, each with its evaluation (train.minutes)
    eval_seconds: float = 0.0  # the last per-epoch test evaluation's wall time (plans train.eval_every > 1)
    planned_epochs: int = 0  # the schedule's length in epochs as last planned (train.minutes); 0: train.epochs
    grad_norm_avg: float = 0.0  # moving average of accepted updates' gradient norms (train.grad_skip)
    init_warm: bool = False  # started from train.init with its generative part loaded: no KL warm-up
    shards: int = 0  # shards per step on the CPU (engine/shards.py), fixed when the run started; 0: one pass


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state = {}, {}
    for idx, entries in sd["state"].items():
        state[str(idx)] = {}
        for k, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                state[str(idx)][k] = v
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, k = name.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save(path: str | Path, *, model, opt, sched, scaler, gen: torch.Generator, perm: torch.Tensor,
         progress: Progress, recipe: dict, rank_rng: list[torch.Tensor] | None = None,
         ema: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    from vae_cli.core.fsutil import write_with

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _split_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    for r, t in enumerate(rank_rng or []):  # under torchrun: every rank's own noise stream
        tensors[f"rng.torch.{r}"] = t
    tensors["rng.data"] = gen.get_state()
    tensors["perm"] = perm.detach().cpu().contiguous()
    tensors.update(ema or {})
    if perm.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(perm.device)
    meta = {"format": FORMAT, "recipe": json.dumps(recipe), "optim": json.dumps(opt_meta),
            "sched": json.dumps(sched.state_dict()), "scaler": json.dumps(scaler.state_dict()),
            "progress": json.dumps(progress.__dict__)}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, parsed metadata) of a state file, or a CheckpointError saying what is wrong."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types for damaged files
        raise CheckpointError(f"resume state '{path}' is unreadable ({type(e).__name__}); it may be truncated: "
                              f"delete it to start the run over") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a vae training state file; delete it to start the run over")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"resume state '{path}' has damaged metadata ({type(e).__name__}); delete it to "
                              f"start the run over") from None
    return tensors, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict, *, model, opt, sched, scaler,
            gen: torch.Generator, device: torch.device, rank: int = 0) -> tuple[torch.Tensor, Progress]:
    """Load everything back into live objects; returns (the epoch's order, progress)."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_join_optimizer(tensors, meta["optim"]))
    # safetensors stores contiguous (NCHW) tensors; give each moment its parameter's layout again (channels-
    # last conv weights), because fused optimizer kernels walk param, grad and moments as flat memory.
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    sched.load_state_dict(meta["sched"])
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors.get(f"rng.torch.{rank}", tensors["rng.torch"]))
    gen.set_state(tensors["rng.data"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return tensors["perm"].to(device), Progress(**meta["progress"])


def _recipe_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            diffs += _recipe_differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            diffs.append(f"{prefix}{k}")
    return diffs


def _with_defaults(saved: dict) -> dict:
    """An interrupted run's recipe with the keys added to the tool since it started at their defaults (each new
    key's default keeps the old behaviour), so an upgrade between the stop and --resume is no difference; a
    recipe this version cannot read at all is compared as it was saved."""
    try:
        return from_dict(saved).to_dict()
    except RecipeError:
        return saved


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """The keys (dotted) in which an interrupted run's saved recipe and the one given to --resume differ."""
    return _recipe_differences(_with_defaults(saved), now)
