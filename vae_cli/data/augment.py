"""Batched, in-memory image augmentation on the training device, every image with its own random draw:
the weak view (random shifts, rotations and horizontal flips in one `affine_grid`/`grid_sample` pass) and
the strong view of consistency training (for colour images a RandAugment-style kornia pipeline: colour
jitter, posterize, solarize, equalize, sharpness, affine and cutout). Every draw goes through `core.rng`:
the calling thread's generator in a sharded training step (derived from the seed and the step, so a resumed
run sees the same augmentations), else torch's global generator."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vae_cli.core import rng


def cutout(x: Tensor, fraction: float) -> Tensor:
    """Zero one random square of side `fraction` x the image side per image (DeVries & Taylor 2017)."""
    if fraction <= 0 or x.ndim != 4:
        return x
    b, _, h, w = x.shape
    sh, sw = max(1, round(h * fraction)), max(1, round(w * fraction))
    cy = rng.randint(0, h, (b, 1, 1), device=x.device)
    cx = rng.randint(0, w, (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    box = ((ys - cy).abs() <= sh // 2) & ((xs - cx).abs() <= sw // 2)
    return x * (~box).unsqueeze(1).to(x.dtype)


def strong(x: Tensor, flip: bool = False) -> Tensor:
    """The 'strong' view for consistency training (FixMatch, Sohn et al. 2020). Grey images: a larger shift
    and rotation than the recipe's augmentation, plus cutout, scaled to the image size so 8x8 and 32x32 both
    get a fair dose. Colour images: `colour_strong`."""
    if x.ndim != 4:
        return x
    if x.shape[1] == 3:
        return colour_strong(x, flip)
    return cutout(augment(x, shift=0.12 * max(x.shape[2:]), rotate=20.0, flip=flip), 0.3)


@functools.lru_cache(maxsize=2)
def _colour_pipeline(flip: bool):
    """RandAugment-style (Cubuk et al. 2020) colour and geometry operations from kornia, each applied to
    each image with its own probability and magnitude, then cutout (DeVries & Taylor 2017) on every image.
    Magnitudes follow FixMatch's RandAugment ranges for 32x32 photos, as fractions of the image size."""
    import kornia.augmentation as K

    ops = [K.RandomHorizontalFlip(p=0.5)] if flip else []
    ops += [K.ColorJiggle(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomPosterize(bits=(4, 8), p=0.2),
            K.RandomSolarize(thresholds=0.1, additions=0.1, p=0.2),
            K.RandomEqualize(p=0.2),
            K.RandomSharpness(sharpness=0.5, p=0.2),
            K.RandomAffine(degrees=20, translate=(0.125, 0.125), shear=10, p=0.7),
            K.RandomErasing(scale=(0.02, 0.25), ratio=(0.5, 2.0), value=0.5, p=1.0)]
    return K.AugmentationSequential(*ops)


def colour_strong(x: Tensor, flip: bool = False) -> Tensor:
    """The strong view of colour images in [0, 1] (B, 3, H, W)."""
    with rng.global_draws():  # kornia draws from the global generator and keeps state on its modules
        out = _colour_pipeline(flip)(x.float())
    return out.clamp(0, 1).to(x.dtype)


def augment(x: Tensor, shift: float = 0.0, rotate: float = 0.0, flip: bool = False,
            whole_pixels: bool = False) -> Tensor:
    """Random shift of up to `shift` pixels, rotation of up to `rotate` degrees and (if `flip`) a
    horizontal flip with probability 1/2, drawn independently per image. Empty borders are zero.
    `whole_pixels` (without rotation): `crop_shift` instead, whole-pixel shifts with mirrored borders."""
    if not (shift or rotate or flip) or x.ndim != 4:
        return x
    if whole_pixels and not rotate:
        return crop_shift(x, int(shift), flip)
    b, _, h, w = x.shape
    dev = x.device
    angle = (rng.rand(b, device=dev) * 2 - 1) * math.radians(rotate)
    sx = torch.where(rng.rand(b, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=dev)
    tx = (rng.rand(b, device=dev) * 2 - 1) * shift * 2 / w  # grid coordinates span 2 per image side
    ty = (rng.rand(b, device=dev) * 2 - 1) * shift * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)


def crop_shift(x: Tensor, shift: int, flip: bool = False) -> Tensor:
    """A random crop of the image padded by `shift` mirrored pixels on every side (the random crop of the
    fast CIFAR-10 trainers: Page 2018, Jordan 2024; FixMatch's weak view), i.e. a shift by a whole number of
    pixels in [-shift, shift] per axis and image, and a horizontal flip with probability 1/2 when `flip`.
    Unlike `augment`'s sub-pixel shifts it never blurs: a training image stays as sharp as a test image."""
    b, _, h, w = x.shape
    s = max(0, min(shift, h - 1, w - 1))  # reflection needs the pad to be smaller than the side
    dev = x.device
    if s:
        dy = rng.randint(0, 2 * s + 1, (b, 1, 1, 1), device=dev)
        dx = rng.randint(0, 2 * s + 1, (b, 1, 1, 1), device=dev)
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        rows = (torch.arange(h, device=dev).view(1, 1, h, 1) + dy).expand(b, x.shape[1], h, w + 2 * s)
        x = padded.gather(2, rows)
        cols = (torch.arange(w, device=dev).view(1, 1, 1, w) + dx).expand(b, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        mirror = rng.rand(b, device=dev) < 0.5
        x = torch.where(mirror.view(b, 1, 1, 1), x.flip(3), x)
    return x
