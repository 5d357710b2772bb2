"""torchvision backbones with the 128-d L2-normalised head, and their weight loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from isif.base.errors import UserError
from isif.models import ModelConfig
from isif.models import build_model as _build


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
