"""`vae sample`: grids of samples, reconstructions and interpolations from a trained model."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import Device, command, runtime_for
from vae_cli.core.errors import UsageError
from vae_cli.core.fsutil import check_output


def _class_index(meta: dict, cls: str) -> int:
    classes = meta["classes"]
    if cls in classes:
        return classes.index(cls)
    if cls.isdigit() and int(cls) < len(classes):
        return int(cls)
    raise UsageError(f"--class '{cls}' is not one of the model's classes: {', '.join(classes)}")


@command("sample", computes=True)
def sample(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    n: int = typer.Option(64, "-n", "--num", min=1, max=4096, help="How many images."),
    cls: str | None = typer.Option(None, "--class", help="Class name or index: class-conditional samples."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Scale of the latent noise."),
    output: Path = typer.Option(Path("samples.png"), "-o", "--output", help="Grid PNG to write."),
    each: Path | None = typer.Option(None, "--each", help="Also write one PNG per image into this folder."),
    reconstruct: bool = typer.Option(False, "--reconstruct",
                                     help="Show test images (or --images) beside their reconstructions."),
    images: list[Path] | None = typer.Option(None, "--images", help="Images to reconstruct (repeatable)."),
    interpolate: tuple[Path, Path] | None = typer.Option(None, "--interpolate", help="Two images: decode "
                                                         "codes on the line between theirs (A.png B.png)."),
    steps: int = typer.Option(10, "--steps", min=2, max=256, help="Images between the two of --interpolate."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for the latent noise."),
    device: Device = typer.Option(Device.auto, "--device"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the paths written."),
) -> None:
    """Draw samples (or reconstructions, or an interpolation) from a trained model into a PNG grid."""
    if not math.isfinite(temperature):
        raise UsageError(f"--temperature must be a finite number, got {temperature}")
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output must end in .png, got '{output}'")
    check_output(output, [weights])
    if each is not None and each.exists() and not each.is_dir():
        raise UsageError(f"--each '{each}' is not a folder; name a folder for the PNGs")
    if interpolate and (reconstruct or images):
        raise UsageError("--interpolate draws its own row; leave out --reconstruct/--images")
    import torch

    from vae_cli.artifacts import checkpoint, pictures
    from vae_cli.data.images import load_for_model

    rt = runtime_for(device)
    model, meta = checkpoint.load(weights, rt.device)
    torch.manual_seed(seed)
    with torch.no_grad(), rt.autocast():
        if interpolate:
            ab = load_for_model(list(interpolate), meta).to(rt.device)
            pics, nrow = pictures.interpolation(model, ab[:1], ab[1:], steps), steps + 2
        elif reconstruct:
            x = _reconstruction_inputs(meta, images, n)
            recon = model.reconstruct(x.to(rt.device)).float().cpu()
            # pairs side by side: input, reconstruction, input, reconstruction ...
            pics = torch.stack([x, recon], 1).flatten(0, 1)
            nrow = 2 * max(1, int(len(x) ** 0.5))
        else:
            y = torch.full((n,), _class_index(meta, cls), device=rt.device) if cls is not None else None
            pics, nrow = model.sample(n, y, temperature).float().cpu(), None
    written = [str(pictures.save_grid(pics, output, nrow))]
    if each is not None:
        written += [str(p) for p in pictures.save_each(pics, each)]
    if as_json:
        show.print_json({"weights": str(weights), "written": written, "n": len(pics)})
    else:
        print(written[0] + (f" (+{len(written) - 1} files in {each})" if each else ""))


def _reconstruction_inputs(meta: dict, images: list[Path] | None, n: int):
    if images:
        from vae_cli.data.images import load_for_model

        return load_for_model(images, meta)
    import torch

    from vae_cli.data import build_dataset, class_mixed

    r = meta["recipe_obj"]
    data = build_dataset(r.data, r.seed, read_only=True)
    return data.test_x[torch.from_numpy(class_mixed(data.test_y.numpy(), n))]  # every class, seeded
