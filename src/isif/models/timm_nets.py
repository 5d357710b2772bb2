"""Any timm model as the backbone: ``--arch timm:NAME`` (the ``isif[timm]`` extra).

The model is built with ``num_classes=0``, so its forward gives pooled features (N, num_features); the usual
head (FC to ``dim``, L2 norm) goes on top. Models with a fixed input size (ViTs and their kin) are built for
the run's input side (``img_size``); the others take any size.

The input recipe comes from timm's own data config of the model (``pretrained_cfg``: input size, mean, std):
without ``--size`` a timm backbone sees images at its own size, and it is always normalised with its own mean
and std (not the data's moments), the normalisation its pretrained weights expect. Both are recorded in the
checkpoint's input spec, so ``embed``, ``search``, ``export`` and ``serve`` use them.

``weights``: ``none`` (random init), ``imagenet`` (timm's pretrained weights: downloaded where there is
internet, else a one-line error naming ``--weights PATH``), or a local file (safetensors, or a torch state
dict; an ``isif export --format safetensors`` file gives its ``backbone.*`` weights). The classifier's keys are
ignored; a missing key or a shape that does not fit is refused naming the first one.
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

from ..base.errors import UserError

PREFIX = "timm:"
INSTALL = "--arch timm:NAME needs timm: pip install 'isif[timm]' (or pip install timm)"


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def timm_module():
    try:
        import timm
    except ImportError:
        raise UserError(INSTALL) from None
    return timm


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(timm_module().list_models())


def model_name(arch: str) -> str:
    """The timm model of ``timm:NAME``, checked against timm's list (the closest names when unknown)."""
    name = arch[len(PREFIX):]
    if name not in _names():
        close = difflib.get_close_matches(name, _names(), n=3, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "`python -c \"import timm; print(timm.list_models())\"`"
        raise UserError(f"unknown timm model {name!r} (--arch {arch}); {hint}")
    return name


def data_config(arch: str) -> dict:
    """timm's input recipe of the model: {"size", "mean", "std"} from its pretrained config."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name(arch))
    if cfg is None:  # a model without any pretrained config: timm's ImageNet defaults
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return {"size": 224, "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD)}
    return {"size": int(cfg.input_size[-1]), "mean": tuple(float(v) for v in cfg.mean),
            "std": tuple(float(v) for v in cfg.std)}


def _create(timm, name: str, size: int | None, pretrained: bool) -> nn.Module:
    kwargs = {"pretrained": pretrained, "num_classes": 0}
    if size is not None:
        try:
            return timm.create_model(name, img_size=size, **kwargs)  # fixed-size models: built for the run's side
        except TypeError:
            pass  # the model takes any input size and no img_size argument
    return timm.create_model(name, **kwargs)


def timm_backbone(arch: str, weights: str | None, size: int | None = None) -> tuple[nn.Module, int]:
    """(the timm model giving pooled features, their width) for ``timm:NAME``."""
    timm = timm_module()
    name = model_name(arch)
    if weights == "imagenet":
        try:
            net = _create(timm, name, size, pretrained=True)
        except Exception as e:  # offline: huggingface_hub / urllib errors of every kind
            raise UserError(f"could not fetch timm's pretrained weights for {name} ({type(e).__name__}); pass "
                            "--weights PATH to a local safetensors or state-dict file of the model, or --weights "
                            "none") from None
    else:
        net = _create(timm, name, size, pretrained=False)
        if weights not in (None, "none"):
            from .weights import load_backbone_weights

            load_backbone_weights(net, str(weights), f"timm's {name}")
    return net, int(net.num_features)
