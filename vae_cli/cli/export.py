"""`vae export`: a part of a trained model as ONNX or TorchScript, checked against PyTorch after writing."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from vae_cli.cli import output as show
from vae_cli.cli.app import command, err


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class Part(str, Enum):
    classifier = "classifier"
    encoder = "encoder"
    decoder = "decoder"


@command("export", computes=True)
def export(
    weights: Path = typer.Argument(..., help="A model.safetensors written by `vae train`."),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", "-f", help="onnx (needs pip install "
                                     "'vae-cli[export]') | torchscript"),
    part: Part = typer.Option(Part.classifier, "--part", help="classifier: image -> class probabilities; encoder: "
                              "image -> latent mean, logvar; decoder: latent (+ class) -> image."),
    output: Path | None = typer.Option(None, "-o", "--output", help="File to write (default: beside the weights, "
                                       "<name>.<part>.onnx or .torchscript)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run the written file (onnxruntime / "
                               "torch.jit.load) on 16 random inputs against PyTorch and report the difference."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: path, metadata, max_abs_diff."),
) -> None:
    """Write one part of a model as a standalone ONNX or TorchScript file, with its preprocessing (channels,
    size, value range, class names) in the file's metadata; dynamic batch size."""
    import torch

    from vae_cli.artifacts import checkpoint
    from vae_cli.artifacts.export import FORMATS, reference_inputs
    from vae_cli.artifacts.export import export as write
    from vae_cli.artifacts.exported import max_abs_diff
    from vae_cli.core.fsutil import check_output
    from vae_cli.core.runtime import cpu_budget

    cpu_budget()  # the check runs the model: threads as every computing command sets them

    stem = weights.name[:-len(weights.suffix)] if weights.suffix else weights.name
    path = check_output(output or weights.with_name(f"{stem}.{part.value}{FORMATS[fmt.value]}"), [weights])
    model, meta = checkpoint.load(weights, torch.device("cpu"))
    info = write(model, meta, part.value, fmt.value, path)
    res = {"path": str(path), "format": fmt.value, "part": part.value, "metadata": info, "max_abs_diff": None}
    if check:
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(16, *meta["image_shape"], generator=gen)
        if meta["preprocess"].get("binarize"):
            images = (images > 0.5).float()
        inputs = reference_inputs(model, part.value, images)
        res["max_abs_diff"] = max_abs_diff(model, part.value, fmt.value, path, inputs)
    if as_json:
        show.print_json(res)
        return
    print(path)
    d = res["max_abs_diff"]
    diff = "" if d is None else f"; max |{fmt.value} - torch| = {d:.2e} on 16 inputs"
    err(f"exported the {part.value} ({info['inputs']} -> {info['outputs']}){diff}")
