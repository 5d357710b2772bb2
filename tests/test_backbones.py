"""torchvision backbones with the 128-d L2-normalised head, and their weight loading."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from isif.base.errors import UserError
from isif.models import BACKBONES, Backbone, ModelConfig, _torchvision
from isif.models import build_model as _build
from isif.models.torchvision_nets import take_classifier_off


def build_model(arch, width=1.0, dim=128, weights=None):
    return _build(ModelConfig(arch, width, dim, weights))


@pytest.mark.parametrize("arch, size", [("googlenet", 227), ("resnet18", 64)])
def test_embedding_is_128_d_and_unit_norm(arch, size):
    torch.manual_seed(0)
    m = build_model(arch, dim=128).eval()
    z = m(torch.randn(2, 3, size, size))
    assert z.shape == (2, 128) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_local_state_dict_is_loaded_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    m = build_model("resnet18", weights=str(tmp_path / "r18.pt"))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    # a DataParallel-style prefix and a wrapping dict are accepted
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "wrapped.pt")
    m2 = build_model("resnet18", weights=str(tmp_path / "wrapped.pt"))
    assert torch.equal(m2.backbone.conv1.weight, ref.conv1.weight)


def test_wrong_or_missing_weights_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(UserError, match="does not fit torchvision's resnet50"):
        build_model("resnet50", weights=str(tmp_path / "r18.pt"))
    with pytest.raises(UserError, match="no such file"):
        build_model("resnet18", weights=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a loadable state dict"):
        build_model("resnet18", weights=str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("resnet18_cifar", weights="imagenet")


def test_imagenet_weights_offline_name_the_fix(monkeypatch):
    import isif.models.torchvision_nets as tvn

    class Offline:
        def get_state_dict(self, progress=False):
            raise OSError("network unreachable")

    monkeypatch.setattr(tvn, "_imagenet_weights", lambda arch: Offline())
    with pytest.raises(UserError, match="--weights PATH"):
        build_model("googlenet", weights="imagenet")


# ----------------------------------------------------------------------------- classifiers that are not .fc


class _Headed(nn.Module):
    """A network whose classifier sits at ``name``: pooled (N, 6) -> ``classifier``."""

    def __init__(self, name: str, classifier: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.name = name
        setattr(self, name, classifier)

    def forward(self, x):
        return getattr(self, self.name)(self.body(x))


@pytest.mark.parametrize("name, classifier", [
    ("fc", nn.Linear(6, 10)),
    ("classifier", nn.Sequential(nn.Dropout(0.2), nn.Linear(6, 10))),  # EfficientNet
    ("classifier", nn.Sequential(nn.Linear(6, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10))),  # MobileNet
    ("head", nn.Linear(6, 10)),  # Swin
    ("heads", nn.Sequential(OrderedDict(head=nn.Linear(6, 10)))),  # ViT
])
def test_the_classifier_is_taken_off_wherever_the_family_keeps_it(name, classifier):
    net = _Headed(name, classifier).eval()
    assert take_classifier_off(net, "toy") == 6
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(net(x), net.body(x))  # pooled features, no dropout, no hidden layer


def test_a_norm_before_the_classifier_stays_and_keeps_its_weights():
    norm = nn.LayerNorm(6)
    net = _Headed("classifier", nn.Sequential(norm, nn.Linear(6, 10))).eval()  # ConvNeXt: norm, flatten, linear
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert take_classifier_off(net, "toy") == 6 and net.classifier[0] is norm
    assert set(net.state_dict()) == {k for k in state if not k.startswith("classifier.1.")}


def test_a_torchvision_backbone_whose_head_is_not_fc(monkeypatch, tmp_path):
    monkeypatch.setitem(BACKBONES, "mobilenet_v3_small", Backbone(
        "mobilenet_v3_small", _torchvision("mobilenet_v3_small"), 576, "torchvision MobileNetV3-Small",
        pretrained=True))
    torch.manual_seed(0)
    m = build_model("mobilenet_v3_small", dim=16).eval()  # AttributeError ('MobileNetV3' ... 'fc') before
    z = m(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 16) and m.backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 576)
    ref = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mnv3.pt")  # the classifier's keys in the file are ignored
    m = build_model("mobilenet_v3_small", dim=16, weights=str(tmp_path / "mnv3.pt"))
    assert torch.equal(m.backbone.features[0][0].weight, ref.features[0][0].weight)
    monkeypatch.setitem(BACKBONES, "mobilenet_v3_small", Backbone(
        "mobilenet_v3_small", _torchvision("mobilenet_v3_small"), 1024, "the hidden layer's width, wrongly"))
    with pytest.raises(ValueError, match="registry says 1024 features, the network has 576"):
        build_model("mobilenet_v3_small")


def test_a_family_without_a_linear_classifier_names_what_to_declare(monkeypatch):
    monkeypatch.setitem(BACKBONES, "squeezenet1_1", Backbone("squeezenet1_1", _torchvision("squeezenet1_1"), 512,
                                                             "torchvision SqueezeNet 1.1"))
    with pytest.raises(UserError, match=r"no Linear classifier at \.fc, \.classifier, \.head, \.heads .* builder of "
                                        r"its own") as e:
        build_model("squeezenet1_1")
    assert "\n" not in str(e.value) and "BACKBONES" in str(e.value)
    monkeypatch.setitem(BACKBONES, "resnet17", Backbone("resnet17", _torchvision("resnet17"), 512, "a typo"))
    with pytest.raises(UserError, match="torchvision has no classification model 'resnet17'"):
        build_model("resnet17")
