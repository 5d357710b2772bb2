"""ImageNet backbones from torchvision, for the unseen-category protocol.

GoogLeNet / Inception-V1 (the paper's network; the embedding FC sits on its
1024-d pool5) and ResNet-18/50. ``weights``: ``None``/``"none"`` for random
init, ``"imagenet"`` for torchvision's ImageNet weights (downloaded where there
is internet), or a local file (``isif.models.weights.read_state_dict``): a state dict
of the torchvision model, as a torch file or ``.safetensors``, or an
``isif export --format safetensors`` file of the same arch, whose
``backbone.*`` weights are used (its head is not).
"""

from __future__ import annotations

from torch import nn

from ..base.errors import UserError
from .weights import isif_backbone, load_state, read_state_dict


def _imagenet_weights(arch: str):
    import torchvision.models as tvm

    return tvm.get_model_weights(arch).IMAGENET1K_V1


def torchvision_backbone(arch: str, weights: str | None, out_dim: int) -> nn.Module:
    """torchvision's ``arch`` with its classifier replaced by the identity: pooled features (N, out_dim).

    ``out_dim`` is the registry's declared width, checked against the network's own classifier input."""
    import torchvision.models as tvm

    pretrained = weights not in (None, "none")
    if arch == "googlenet":
        # the ported ImageNet weights expect torchvision's input re-normalisation
        net = tvm.googlenet(weights=None, aux_logits=False, init_weights=not pretrained, transform_input=pretrained)
    else:
        net = getattr(tvm, arch)(weights=None)
    if net.fc.in_features != out_dim:
        raise ValueError(f"{arch}: the registry says {out_dim} features, the network has {net.fc.in_features}")
    net.fc = nn.Identity()  # the classifier is replaced: a state's fc.* keys are not loaded
    if weights == "imagenet":
        try:
            state = _imagenet_weights(arch).get_state_dict(progress=False)
        except Exception as e:  # no internet, no cache
            raise UserError(f"could not fetch torchvision's ImageNet weights for {arch} ({type(e).__name__}); "
                            "pass --weights PATH to a local state dict, or --weights none") from None
        load_state(net, state, f"torchvision's {arch}", "torchvision's ImageNet weights")
    elif pretrained:
        state, meta = read_state_dict(weights)
        exported = (meta or {}).get("model", {}).get("arch")
        if exported is not None and exported != arch:
            raise UserError(f"--weights {weights} holds an isif export of {exported}, not {arch}; pass "
                            f"--arch {exported}, or weights of {arch}")
        load_state(net, isif_backbone(state, meta), f"torchvision's {arch}", str(weights))
    return net
