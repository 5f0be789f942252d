"""Running an exported file: onnxruntime for ONNX, torch.jit.load for TorchScript; used to check an
export against the PyTorch model it came from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vae_cli.artifacts.export import torch_outputs
from vae_cli.core.errors import UsageError


def run_onnx(path: Path, inputs: tuple[Tensor, ...]) -> tuple[list[np.ndarray], dict[str, str]]:
    """(outputs, metadata) of an ONNX file run by onnxruntime on the CPU."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("checking an ONNX file needs onnxruntime: pip install 'vae-cli[export]' "
                         "(or pass --no-check)") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    return out, dict(sess.get_modelmeta().custom_metadata_map)


def run_torchscript(path: Path, inputs: tuple[Tensor, ...]) -> tuple[list[np.ndarray], dict[str, str]]:
    extra = {"vae.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation note
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        out = module(*inputs)
    out = list(out) if isinstance(out, tuple) else [out]
    return [o.numpy() for o in out], json.loads(extra["vae.json"])


def max_abs_diff(model, part: str, fmt: str, path: Path, inputs: tuple[Tensor, ...]) -> float:
    got, _ = (run_onnx if fmt == "onnx" else run_torchscript)(path, inputs)
    want = torch_outputs(model, part, inputs)
    return float(max(np.abs(g - w.numpy()).max() for g, w in zip(got, want)))
