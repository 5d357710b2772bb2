"""Export a trained embedding network to TorchScript, ONNX or safetensors, checked against the checkpoint.

The exported TorchScript or ONNX graph takes float RGB images in [0, 1], (N, 3, S, S) with any N,
applies the training normalisation itself and returns the L2-normalised
embedding. How to get from a photo to that tensor (the resize and crop) is
written beside the model as ``<out>.json``.

``safetensors`` writes the weights only (``model.state_dict()``, no optimiser, no pickle) with the
architecture and input spec as the file's ``"isif"`` metadata (see ``isif.models.weights``), and the same JSON
beside it; ``isif.load_model`` (``collection.network``) and ``--weights`` read it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..base import __version__
from ..base.errors import UserError
from ..base.files import atomic_write_bytes, sha256_file
from ..base.settings import one_of, setting
from ..data.input_spec import InputSpec
from .network import load_from_checkpoint, load_model
from .options import checkpoint_arg


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


def _onnx(net: nn.Module, example: torch.Tensor, check: torch.Tensor, out: Path) -> tuple[bytes, torch.Tensor]:
    """(``net`` traced on ``example`` as an ONNX file's bytes, that file's output on ``check`` through
    onnxruntime); nothing is left on disk (the exporter's scratch file beside ``out`` is removed)."""
    ort, dynamo = _onnx_modules()
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".export", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["embedding"],
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(net, (example,), str(tmp), input_names=["images"], output_names=["embedding"],
                                  dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
        data = tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: check.numpy()})[0])


def _keep(out: Path, write_model, spec_path: Path, meta: dict) -> None:
    """Write the checked export (``write_model()`` puts it at ``out`` atomically), then its JSON atomically; a
    failure writing the JSON removes the model again, so the two are kept together or not at all."""
    write_model()
    try:
        atomic_write_bytes(spec_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    except BaseException:
        out.unlink(missing_ok=True)
        raise


FORMATS = ("torchscript", "onnx", "safetensors")


@dataclass(kw_only=True)
class ExportOptions:
    checkpoint: str = checkpoint_arg()
    format: str = setting("torchscript", "torchscript or onnx: a graph with the normalisation inside; safetensors: "
                                         "the weights, with the architecture and input recipe in its metadata "
                                         "(isif.load_model and --weights read it)",
                          check=one_of("torchscript", "onnx", "safetensors"))
    out: str | None = setting(None, "output file (default CHECKPOINT_NAME.torchscript.pt, .onnx or .safetensors "
                                    "beside it)")
    atol: float = setting(1e-5, "largest allowed embedding difference")


@dataclass
class ExportResult:
    format: str
    out: Path
    spec: Path  # the JSON beside it: preprocessing (graphs) or architecture and input recipe (safetensors)
    max_abs_diff: float  # largest embedding difference from the checkpoint on a fresh batch
    checked: int  # images in that batch
    input: str


def export(o: ExportOptions, check_batch: int = 4) -> ExportResult:
    """``isif export``: the checkpoint as ``o.format``, kept only when it agrees with the checkpoint to ``o.atol``."""
    r = export_file(o.checkpoint, o.format, Path(o.out) if o.out else None, o.atol, check_batch)
    return ExportResult(r["format"], Path(r["out"]), Path(r["spec"]), r["max_abs_diff"], r["checked"], r["input"])


def export_file(checkpoint: str, fmt: str, out: Path | None = None, atol: float = 1e-5,
                check_batch: int = 4) -> dict:
    """Export ``checkpoint`` (a .pt file or a run folder) as ``fmt``, run the export on a fresh batch and keep it
    only when it agrees with the checkpoint to ``atol``; returns what was written."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, got {fmt!r}")
    if fmt == "safetensors":
        return export_safetensors(checkpoint, out, atol, check_batch)
    loaded = load_from_checkpoint(checkpoint, "cpu")
    path, cfg, spec = loaded.source, loaded.config, loaded.input_spec
    model = loaded.network.float().to(memory_format=torch.contiguous_format).eval()
    size = spec.size
    net = Exportable(model, spec.mean, spec.std).eval()
    if out is None:
        out = path.with_suffix(".torchscript.pt" if fmt == "torchscript" else ".onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=g)
    check = torch.rand(check_batch, 3, size, size, generator=g)  # another batch size than the example's
    with torch.no_grad():
        want = net(check)
    try:
        data, got = _torchscript(net, example, check) if fmt == "torchscript" else _onnx(net, example, check, out)
    except UserError:
        raise
    except Exception as e:  # a network the tracer or the ONNX exporter cannot take
        other = "onnx" if fmt == "torchscript" else "torchscript"
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{cfg.model.arch} cannot be exported to {fmt} ({type(e).__name__}: {reason}); "
                        f"--format safetensors works for every network (weights and input recipe, read by "
                        f"isif.load_model), and --format {other} may") from None
    diff = float((got.float() - want).abs().max())
    if not diff <= atol:  # checked before anything is written: a failed export leaves --out as it was
        raise UserError(f"the {fmt} export differs from the checkpoint by {diff:.2e} (> --atol {atol:g}); "
                        "nothing was kept")
    meta = {"format": fmt, "input": [None, 3, size, size], "value_range": [0.0, 1.0],
            "resize": [spec.resize, spec.resize] if spec.resize else f"shorter side to {size}",
            "crop": f"centre {size}x{size}", "normalisation": "inside the model", "mean": list(spec.mean),
            "std": list(spec.std), "output": [None, int(getattr(model, "dim", cfg.model.dim))], "l2_normalised": True,
            "checkpoint": str(path), "arch": cfg.model.arch, "max_abs_diff": diff}
    spec_path = out.with_name(out.name + ".json")
    _keep(out, lambda: atomic_write_bytes(out, lambda f: f.write(data)), spec_path, meta)
    return {"format": fmt, "out": str(out), "spec": str(spec_path), "max_abs_diff": diff, "checked": check_batch,
            "input": f"(N, 3, {size}, {size}) floats in [0, 1]"}


def _torchscript(net: nn.Module, example: torch.Tensor, check: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """(``net`` traced on ``example`` as a saved TorchScript file's bytes, that file loaded back and run on
    ``check``); nothing is written to disk."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        return data, torch.jit.load(io.BytesIO(data))(check)


def safetensors_metadata(path: Path, cfg, spec: InputSpec) -> dict:
    """The ``"isif"`` metadata of a safetensors export: architecture, input spec, precision, provenance."""
    from ..models.weights import FORMAT_VERSION
    from ..training.step import network_embedding

    return {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(cfg.model), "input": spec.to_dict(),
            "embedding": network_embedding(cfg),
            "precision": cfg.train.precision, "channels_last": bool(cfg.train.channels_last),
            "checkpoint_sha256": sha256_file(path), "isif_version": __version__}


def export_safetensors(checkpoint: str, out: Path | None = None, atol: float = 1e-5, check_batch: int = 4) -> dict:
    """The network's weights as stored (no optimiser) in ``out`` (default CHECKPOINT.safetensors) with the
    metadata inside and in ``<out>.json``; read back with ``isif.load_model`` and compared on a fresh batch."""
    from ..models.weights import write_safetensors

    loaded = load_from_checkpoint(checkpoint, "cpu")
    path, cfg, spec, model = loaded.source, loaded.config, loaded.input_spec, loaded.network
    meta = safetensors_metadata(path, cfg, spec)
    out = Path(out) if out is not None else path.with_suffix(".safetensors")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: a safetensors export must end in .safetensors (load_model and --weights "
                        "tell the formats by their suffix)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # written under a temporary name (load_model tells the format by the suffix) and moved to --out only once the
    # file read back agrees with the checkpoint: a failed export leaves --out as it was
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".unchecked.safetensors", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_safetensors(tmp, model.state_dict(), meta)
        size, dtype = spec.size, next(model.parameters()).dtype
        check = torch.rand(check_batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            want, got = model(check), load_model(tmp).network(check)
        diff = float((got.double() - want.double()).abs().max())
        if not diff <= atol:
            raise UserError(f"the safetensors export differs from the checkpoint by {diff:.2e} (> --atol "
                            f"{atol:g}); nothing was kept")
        spec_path = out.with_name(out.name + ".json")
        _keep(out, lambda: os.replace(tmp, out), spec_path, meta)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": "safetensors", "out": str(out), "spec": str(spec_path), "max_abs_diff": diff,
            "checked": check_batch, "input": f"(N, 3, {size}, {size}), normalised by the metadata's mean and std"}
