"""Batched, in-memory image augmentation: random shifts, rotations and horizontal flips in one
`affine_grid`/`grid_sample` pass on the whole batch (no per-image Python work)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def cutout(x: Tensor, fraction: float) -> Tensor:
    """Zero one random square of side `fraction` x the image side per image (DeVries & Taylor 2017)."""
    if fraction <= 0 or x.ndim != 4:
        return x
    b, _, h, w = x.shape
    sh, sw = max(1, round(h * fraction)), max(1, round(w * fraction))
    cy = torch.randint(0, h, (b, 1, 1), device=x.device)
    cx = torch.randint(0, w, (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((ys - cy).abs() <= sh // 2) & ((xs - cx).abs() <= sw // 2)
    return x * (~box).unsqueeze(1).to(x.dtype)


def strong(x: Tensor, flip: bool = False) -> Tensor:
    """The 'strong' view for consistency training: a larger shift and rotation than the recipe's
    augmentation, plus cutout; scaled to the image size so 8x8 and 32x32 both get a fair dose."""
    if x.ndim != 4:
        return x
    return cutout(augment(x, shift=0.12 * max(x.shape[2:]), rotate=20.0, flip=flip), 0.3)


def augment(x: Tensor, shift: float = 0.0, rotate: float = 0.0, flip: bool = False) -> Tensor:
    """Random shift of up to `shift` pixels, rotation of up to `rotate` degrees and (if `flip`) a
    horizontal flip with probability 1/2, drawn independently per image. Empty borders are zero."""
    if not (shift or rotate or flip) or x.ndim != 4:
        return x
    b, _, h, w = x.shape
    dev = x.device
    angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(rotate)
    sx = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    tx = (torch.rand(b, device=dev) * 2 - 1) * shift * 2 / w  # grid coordinates span 2 per image side
    ty = (torch.rand(b, device=dev) * 2 - 1) * shift * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)
