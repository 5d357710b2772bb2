"""ImageNet backbones from torchvision, for the unseen-category protocol.

GoogLeNet / Inception-V1 (the paper's network; the embedding FC sits on its
1024-d pool5) and ResNet-18/50; any other torchvision classifier whose head is
``.fc``, ``.classifier``, ``.head`` or ``.heads`` takes one registry line. ``weights``: ``None``/``"none"`` for random
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


HEADS = ("fc", "classifier", "head", "heads")  # where torchvision's families keep their classifier


def take_classifier_off(net: nn.Module, arch: str) -> int:
    """Replace ``net``'s classifier by the identity, so that its forward gives the pooled features, and return
    their width: the input width of the classifier's first Linear layer.

    The classifier is the first of ``net.fc``, ``.classifier``, ``.head``, ``.heads`` that holds a Linear layer:
    that layer itself (ResNet, GoogLeNet, DenseNet, Swin), or a Sequential (MobileNet, EfficientNet, ConvNeXt,
    ViT) whose layers from its first Linear on, and the Dropout before it, become identities (the ones before it,
    ConvNeXt's norm and flatten, stay, so their weights still load). UserError for a family with none of them."""
    for name in HEADS:
        head = getattr(net, name, None)
        if isinstance(head, nn.Linear):
            setattr(net, name, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential):
            layers = list(head.named_children())
            first = next((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), None)
            if first is None:
                continue
            for i, (key, m) in enumerate(layers):
                if i >= first or isinstance(m, nn.Dropout):
                    setattr(head, key, nn.Identity())
            return layers[first][1].in_features
    raise UserError(f"torchvision's {arch} has no Linear classifier at .{', .'.join(HEADS)} to take off; declare "
                    "its entry in BACKBONES (isif/models/__init__.py) with a builder of its own: a function "
                    "(width, weights) -> nn.Module whose forward gives pooled features (N, F)")


def _network(arch: str, pretrained: bool) -> nn.Module:
    import torchvision.models as tvm

    if arch == "googlenet":
        # the ported ImageNet weights expect torchvision's input re-normalisation
        return tvm.googlenet(weights=None, aux_logits=False, init_weights=not pretrained, transform_input=pretrained)
    if arch not in tvm.list_models(module=tvm):
        raise UserError(f"torchvision has no classification model {arch!r}; see torchvision.models.list_models()")
    return tvm.get_model(arch, weights=None)


def torchvision_backbone(arch: str, weights: str | None, out_dim: int) -> nn.Module:
    """torchvision's ``arch`` with its classifier taken off (``take_classifier_off``): pooled features (N, out_dim).

    ``out_dim`` is the registry's declared width, checked against the classifier's input: a wrong one is an error
    here, never a silently mis-sized head."""
    pretrained = weights not in (None, "none")
    net = _network(arch, pretrained)
    features = take_classifier_off(net, arch)  # the classifier's keys of a state are then not loaded
    if features != out_dim:
        raise ValueError(f"{arch}: the registry says {out_dim} features, the network has {features}")
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
