"""Export a trained embedding network to TorchScript or ONNX, checked against the checkpoint.

The exported graph takes float RGB images in [0, 1], (N, 3, S, S) with any N,
applies the training normalisation itself and returns the L2-normalised
embedding. How to get from a photo to that tensor (the resize and crop) is
written beside the model as ``<out>.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model, resolve_checkpoint
from .embed import input_spec
from .errors import UserError
from .io import atomic_write_bytes


class Exportable(nn.Module):
    """Normalisation + network, in float32 and eval mode."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _onnx_modules():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install 'isif[onnx]'") from None
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking the ONNX export needs onnxruntime: pip install 'isif[onnx]'") from None
    try:
        import onnxscript  # noqa: F401

        dynamo = True
    except ImportError:
        dynamo = False  # the TorchScript-based exporter needs only onnx
    return onnxruntime, dynamo


def export(checkpoint: str, fmt: str, out: Path | None = None, atol: float = 1e-5, check_batch: int = 4) -> dict:
    if fmt not in ("torchscript", "onnx"):
        raise UserError(f"--format must be torchscript or onnx, got {fmt!r}")
    path = resolve_checkpoint(checkpoint)
    model, cfg, state = load_model(path, "cpu")
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    spec = input_spec(state, cfg)
    size = spec["size"]
    net = Exportable(model, spec["mean"], spec["std"]).eval()
    if out is None:
        out = path.with_suffix(".torchscript.pt" if fmt == "torchscript" else ".onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=g)
    check = torch.rand(check_batch, 3, size, size, generator=g)  # another batch size than the example's
    with torch.no_grad():
        want = net(check)
    quiet = contextlib.redirect_stdout(io.StringIO())
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, example)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        atomic_write_bytes(out, lambda f: f.write(buf.getvalue()))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            got = torch.jit.load(str(out))(check)
    else:
        ort, dynamo = _onnx_modules()
        tmp = out.with_name(f".{out.name}.export")
        with warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["embedding"],
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["embedding"],
                                  dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
        data = tmp.read_bytes()
        tmp.unlink()
        atomic_write_bytes(out, lambda f: f.write(data))
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: check.numpy()})[0])
    diff = float((got.float() - want).abs().max())
    meta = {"format": fmt, "input": [None, 3, size, size], "value_range": [0.0, 1.0],
            "resize": [spec["resize"], spec["resize"]] if spec["resize"] else f"shorter side to {size}",
            "crop": f"centre {size}x{size}", "normalisation": "inside the model", "mean": list(spec["mean"]),
            "std": list(spec["std"]), "output": [None, cfg.model.dim], "l2_normalised": True,
            "checkpoint": str(path), "arch": cfg.model.arch, "max_abs_diff": diff}
    spec_path = out.with_name(out.name + ".json")
    atomic_write_bytes(spec_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    if not diff <= atol:
        out.unlink()
        raise UserError(f"the {fmt} export differs from the checkpoint by {diff:.2e} (> --atol {atol:g}); "
                        "nothing was kept")
    return {"format": fmt, "out": str(out), "spec": str(spec_path), "max_abs_diff": diff, "checked": check_batch,
            "input": f"(N, 3, {size}, {size}) floats in [0, 1]"}
