"""The statistics behind the `--reject` scores (evaluation/reject.py): an image's length as a PNG (its
complexity), the classifier's confidence as an unsaturated logit, conformal p-values of a value among the
held-out training images' (with a normal tail beyond them), and Fisher's method joining several p-values."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import Tensor


def png_bits(x: Tensor) -> Tensor:
    """Each image's length in bits as a losslessly compressed PNG (zlib level 9) of its 8-bit pixels, as
    the model sees it (after resizing): the complexity estimate L(x) of Serra et al. 2020. Deterministic
    for a given image."""
    from PIL import Image

    out = []
    for xb in x.split(512):  # batch by batch: x may be images streamed from disk
        out += _png_bits(Image, xb)
    return torch.tensor(out, dtype=torch.float64)


def _png_bits(Image, x: Tensor) -> list[int]:
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        a = a[..., 0] if a.shape[2] == 1 else a if a.shape[2] in (3, 4) else a.reshape(a.shape[0], -1)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=9)
        out.append(len(buf.getvalue()) * 8)
    return out


def confidence_logit(probs: Tensor) -> Tensor:
    """log(p_max / (1 - p_max)) with 1 - p_max summed from the other classes: monotone in the maximum
    softmax probability, but it does not saturate at 1.0 the way float32 probabilities do."""
    p = probs.double().sort(1, descending=True).values
    top, rest = p[:, 0], p[:, 1:].sum(1)
    return torch.log(top.clamp_min(1e-300)) - torch.log(rest.clamp_min(1e-300))


def tail_logp(values: Tensor, held_out_sorted: list[float], side: str = "lower", in_sample: bool = False) -> Tensor:
    """Log of a conformal p-value of each value among the held-out ones (Vovk et al. 2005): lower tail
    (#{held-out <= v} + 1) / (n + 1), upper tail likewise with >=, two-sided 2 * min(lower, upper) capped
    at 1 (a typicality test, Nalisnick et al. 2019b: too typical-looking is as suspect as too unusual).
    Uniform for in-distribution images. For the held-out images themselves (`in_sample`) the count already
    holds the image, so no 1 is added: their p-values then follow a new image's law.

    Beyond the held-out range a rank p-value would stop at 1/(n+1) however far out an image lies (a few
    hundred held-out images cannot tell noise from a merely odd digit), so there it keeps falling as a
    normal tail fitted to the held-out values, continuous at the extreme held-out value."""
    ref = torch.tensor(held_out_sorted, dtype=torch.float64)
    v, n, add = values.double().contiguous(), len(ref), 0.0 if in_sample else 1.0
    mean, std = ref.mean(), (ref.std() if n > 1 else torch.tensor(1.0, dtype=torch.float64)).clamp_min(1e-12)
    z = (v - mean) / std
    log_n1 = math.log(n + 1.0)

    def one_side(count: Tensor, beyond: Tensor, z_v: Tensor, z_edge: Tensor) -> Tensor:
        rank = torch.log((count + add).clamp_min(1.0)) - log_n1
        decay = torch.special.log_ndtr(z_v) - torch.special.log_ndtr(z_edge)
        return torch.where(beyond, -log_n1 + decay.clamp_max(0.0), rank)

    lower = one_side(torch.searchsorted(ref, v, right=True).double(), v < ref[0], z, (ref[0] - mean) / std)
    if side == "lower":
        return lower
    upper = one_side(n - torch.searchsorted(ref, v, right=False).double(), v > ref[-1], -z, -(ref[-1] - mean) / std)
    return upper if side == "upper" else (math.log(2.0) + torch.minimum(lower, upper)).clamp_max(0.0)


Part = tuple[str, str]  # a base score and the tail its p-value is taken from: lower, upper or two


def fisher(parts: tuple[Part | tuple[Part, ...], ...], optional: tuple[str, ...] = (),
           older: dict[str, str] | None = None):
    """Fisher's method (Fisher 1925) over the p-values of base scores, each with its tail, sign-flipped
    (higher: more typical): 2 * sum(log p_i). Fisher's method assumes independent p-values, so a group of
    parts that measure one thing (a tuple of parts) first becomes one p-value by Bonferroni's bound, k times
    the smallest of its k, capped at 1. An `optional` part joins when the model has it (its held-out values
    were stored); a part in `older` (newer name -> older name) is replaced by the older base score in files
    calibrated before the newer one existed."""
    older = older or {}

    def combine(base: dict[str, Tensor], held: dict[str, list[float]], in_sample: bool = False) -> Tensor:
        def logp(part: Part) -> Tensor:
            name, side = part
            name = older[name] if name in older and name not in held else name
            return tail_logp(base[name], held[name], side, in_sample)

        total = 0.0
        for part in parts:
            group = part if isinstance(part[0], tuple) else (part,)
            group = tuple(g for g in group if g[0] not in optional or g[0] in held)
            if group:
                least = torch.stack([logp(g) for g in group]).min(0).values
                total = total + (math.log(len(group)) + least).clamp_max(0.0)
        return 2.0 * total
    return combine
