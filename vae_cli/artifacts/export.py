"""`vae export`: one part of a trained model as an ONNX or TorchScript file that runs without this tool.

Parts (each a small module around the model's own methods, so the exported graph is the code that
`classify`, `embed` and `sample` run):

  classifier  image (N, C, H, W) float32 in [0, 1] -> probs (N, classes)
  encoder     image -> mean, logvar (N, latent_dim): q(z | x)
  decoder     z (N, latent_dim) [+ y (N, classes) class weights, for models whose decoder takes a class]
              -> image (N, C, H, W) in [0, 1]

What a user needs to prepare inputs travels inside the file: ONNX `metadata_props`, TorchScript an extra
file `vae.json` (torch.jit.load(path, _extra_files={"vae.json": ""})). Keys: part, inputs, outputs,
channels, height, width, value_range, binarize, classes, latent_dim, model, vae_version.

The ONNX writer is torch's TorchScript-based exporter (`dynamo=False`): it needs only the `onnx` package,
where the newer exporter also needs onnxscript; both are optional (`pip install 'vae-cli[export]'`).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vae_cli import __version__
from vae_cli.core.errors import UsageError
from vae_cli.core.fsutil import write_with

PARTS = ("classifier", "encoder", "decoder")
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript"}
OPSET = 17


class Classifier(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model.class_probs(image)


class Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.latent_posterior(image)


class Decoder(nn.Module):
    def __init__(self, model, conditional: bool):
        super().__init__()
        self.model, self.conditional = model, conditional

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        return self.model.decode_latents(z, y if self.conditional else None)


def decoder_takes_class(model) -> bool:
    """Whether the model's decoder reads a class (M2 does; a VAE's and M1+M2's decode z alone)."""
    z = torch.zeros(1, model.latent_size, device=model.device)
    with torch.no_grad():
        a = model.decode_latents(z, torch.zeros(1, dtype=torch.long, device=model.device))
        b = model.decode_latents(z, torch.ones(1, dtype=torch.long, device=model.device) % model.num_classes)
    return model.num_classes > 1 and not torch.equal(a, b)


def wrapped(model, part: str) -> tuple[nn.Module, tuple[Tensor, ...], list[str], list[str]]:
    """(module, example inputs, input names, output names) of one part, on the CPU, batch of 2."""
    c, h, w = model.image_shape
    image = torch.rand(2, c, h, w)
    if part == "classifier":
        return Classifier(model), (image,), ["image"], ["probs"]
    if part == "encoder":
        return Encoder(model), (image,), ["image"], ["mean", "logvar"]
    z = torch.randn(2, model.latent_size)
    if decoder_takes_class(model):
        y = torch.eye(model.num_classes)[:2]
        return Decoder(model, True), (z, y), ["z", "y"], ["image"]
    return Decoder(model, False), (z,), ["z"], ["image"]


def describe(meta: dict, part: str, inputs: list[str], outputs: list[str], latent_dim: int) -> dict[str, str]:
    pre = meta["preprocess"]
    c, h, w = meta["image_shape"]
    mode = {1: "grey (L)", 3: "RGB"}.get(c, f"{c} channels")
    binarised = "; threshold at 0.5 (binarised)" if pre.get("binarize") else ""
    return {"part": part, "inputs": ",".join(inputs), "outputs": ",".join(outputs), "channels": str(c),
            "height": str(h), "width": str(w), "value_range": json.dumps(pre.get("range", [0.0, 1.0])),
            "binarize": json.dumps(bool(pre.get("binarize"))), "classes": json.dumps(meta["classes"]),
            "latent_dim": str(latent_dim), "model": meta.get("model", ""),
            "vae_version": __version__,
            "preprocess": f"decode the image, convert to {mode}, resize to {w}x{h} (width x height), scale pixel "
                          f"values to [0, 1] (value / 255), layout N,C,H,W float32{binarised}"}


def export(model, meta: dict, part: str, fmt: str, path: Path) -> dict:
    """Write one part in one format to `path` (atomically); returns the metadata written."""
    if part not in PARTS:
        raise UsageError(f"--part must be one of {', '.join(PARTS)}, got '{part}'")
    model = model.to("cpu").eval().requires_grad_(False)  # outputs of the file then need no .detach()
    module, example, inputs, outputs = wrapped(model, part)
    info = describe(meta, part, inputs, outputs, model.latent_size)
    if fmt == "onnx":
        data = _onnx_bytes(module, example, inputs, outputs, info)
    elif fmt == "torchscript":
        data = _torchscript_bytes(module, example, info)
    else:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    write_with(path, lambda tmp: tmp.write_bytes(data))
    return info


def _onnx_bytes(module, example, inputs, outputs, info: dict[str, str]) -> bytes:
    try:
        import onnx
    except ImportError:
        raise UsageError("--format onnx needs the export extra: pip install 'vae-cli[export]'") from None
    buf = io.BytesIO()
    dynamic = {n: {0: "batch"} for n in inputs + outputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
        torch.onnx.export(module, example, buf, input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    for k, v in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "vae-cli"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _torchscript_bytes(module, example, info: dict[str, str]) -> bytes:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"vae.json": json.dumps(info)})  # (newer torch: deprecated)
    return buf.getvalue()


def reference_inputs(model, part: str, images: Tensor) -> tuple[Tensor, ...]:
    """Inputs for checking an exported part: the images, or their latent means (and one-hot classes)."""
    if part != "decoder":
        return (images,)
    with torch.no_grad():
        z = model.latent_means(images)
        if decoder_takes_class(model):
            return z, torch.nn.functional.one_hot(model.class_probs(images).argmax(1), model.num_classes).float()
    return (z,)


def torch_outputs(model, part: str, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    module = wrapped(model, part)[0].eval()
    with torch.no_grad():
        out = module(*inputs)
    return list(out) if isinstance(out, tuple) else [out]
