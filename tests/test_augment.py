"""Batched augmentation: exact per-image equality with torchvision's functional ops for the same
parameters, and parameter distributions that match torchvision's own samplers."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from isif.data.augment import (
    BatchAugment,
    CropParams,
    PlainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    resized_crop,
    sample_crop_params,
    sample_jitter_params,
)

MEAN, STD = (0.49, 0.48, 0.45), (0.20, 0.20, 0.20)


def images(n=32, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:3] = x[:3, :1]  # grey images: zero chroma
    return x


def test_resized_crop_equals_torchvision_for_the_same_boxes():
    x = images(24).float() / 255
    p = sample_crop_params(24, 32, 32, generator=torch.Generator().manual_seed(1))
    flip = torch.arange(24) % 2 == 0
    out = resized_crop(x, p, 32, flip)
    for k in range(24):
        ref = TF.resized_crop(x[k], int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]),
                              [32, 32], antialias=False)
        if flip[k]:
            ref = TF.horizontal_flip(ref)
        assert (out[k] - ref).abs().max() < 1e-5, k


def test_resized_crop_other_output_size():
    x = images(4, size=40).float() / 255
    p = CropParams(torch.tensor([0, 3, 10, 0]), torch.tensor([0, 5, 2, 7]), torch.tensor([40, 20, 30, 33]),
                   torch.tensor([40, 30, 17, 33]))
    out = resized_crop(x, p, 24)
    for k in range(4):
        ref = TF.resized_crop(x[k], int(p.top[k]), int(p.left[k]), int(p.height[k]), int(p.width[k]), [24, 24],
                              antialias=False)
        assert (out[k] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("op, ref", [
    (adjust_brightness, TF.adjust_brightness),
    (adjust_contrast, TF.adjust_contrast),
    (adjust_saturation, TF.adjust_saturation),
    (adjust_hue, TF.adjust_hue),
])
def test_colour_ops_equal_torchvision(op, ref):
    x = images(16).float() / 255
    g = torch.Generator().manual_seed(3)
    f = (torch.rand(16, generator=g) - 0.5) if op is adjust_hue else 0.6 + 0.8 * torch.rand(16, generator=g)
    out = op(x.clone(), f)
    # luma weights are PIL's 0.299/0.587/0.114 (the reference code's path); torchvision's tensor path
    # uses 0.2989, a difference below 1e-3 on [0, 1] images
    tol = 2e-3 if op in (adjust_contrast, adjust_saturation) else 1e-5
    for k in range(16):
        assert (out[k] - ref(x[k], float(f[k]))).abs().max() < tol


def test_full_pipeline_equals_torchvision_per_image_with_same_parameters():
    aug = BatchAugment(32, MEAN, STD)
    x = images(20)
    params = aug.sample(20, 32, 32, torch.Generator().manual_seed(4))
    out = aug.apply(x, params)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(20):
        c = params.crop
        img = TF.resized_crop(x[k].float() / 255, int(c.top[k]), int(c.left[k]), int(c.height[k]),
                              int(c.width[k]), [32, 32], antialias=False)
        if params.flip[k]:
            img = TF.horizontal_flip(img)
        for o in params.jitter.order[k].tolist():
            img = ops[o](img, float(params.jitter.factors[k, o]))
        if params.gray[k]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        img = TF.normalize(img, MEAN, STD)
        assert (out[k] - img).abs().max() < 2e-2 / min(STD), k  # luma weights differ by 1e-4


def _se(p, n):
    return math.sqrt(p * (1 - p) / n)


def test_crop_parameter_distribution_matches_torchvision():
    n = 20000
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(32, scale=(0.2, 1.0))
    dummy = torch.zeros(3, 32, 32)
    ref = []
    for _ in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(dummy, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3]) \
            if hasattr(T.RandomResizedCrop, "get_params") else _tv_params(rrc, dummy)
        ref.append((i, j, h, w))
    ref = torch.tensor(ref, dtype=torch.float64)
    p = sample_crop_params(n, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = torch.stack([p.top, p.left, p.height, p.width], 1).double()
    for name, fn in {
        "area": lambda t: t[:, 2] * t[:, 3] / 1024,
        "log aspect": lambda t: torch.log(t[:, 3] / t[:, 2]),
        "top": lambda t: t[:, 0],
        "left": lambda t: t[:, 1],
    }.items():
        a, b = fn(ours), fn(ref)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se, name
        assert abs(a.std() - b.std()) < 0.05 * b.std() + 1e-9, name
        for q in (0.1, 0.5, 0.9):
            assert abs(torch.quantile(a, q) - torch.quantile(b, q)) <= 0.05 * (b.max() - b.min()) + 1, (name, q)
    assert ours[:, 2].min() >= 1 and ours[:, 2].max() <= 32 and ours[:, 3].max() <= 32
    # area fraction is roughly uniform on [0.2, 1] before rounding and fitting
    area = ours[:, 2] * ours[:, 3] / 1024
    assert 0.17 < area.min() and area.max() <= 1.0


def _tv_params(rrc, img):
    params = rrc.make_params([img])
    return params["top"], params["left"], params["height"], params["width"]


def test_crop_fallback_is_a_centre_crop_with_clamped_ratio():
    # a 10x100 image: no box of ratio in [3/4, 4/3] and area >= 0.99 fits, so every draw falls back
    p = sample_crop_params(50, 10, 100, scale=(0.99, 1.0), generator=torch.Generator().manual_seed(0))
    assert (p.height == 10).all() and (p.width == round(10 * 4 / 3)).all()
    assert (p.top == 0).all() and (p.left == (100 - 13) // 2).all()


def test_jitter_factor_distribution_matches_colorjitter():
    n = 20000
    p = sample_jitter_params(n, (0.4, 0.4, 0.4, 0.4), torch.Generator().manual_seed(0))
    cj = T.ColorJitter(0.4, 0.4, 0.4, 0.4)
    torch.manual_seed(0)
    ref = []
    for _ in range(2000):
        fn_idx, b, c, s, h = T.ColorJitter._get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue) \
            if hasattr(T.ColorJitter, "_get_params") else _cj_params(cj)
        ref.append([b, c, s, h])
    ref = torch.tensor(ref)
    lo = torch.tensor([0.6, 0.6, 0.6, -0.4])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.4])
    assert (p.factors >= lo).all() and (p.factors <= hi).all()
    assert (ref >= lo - 1e-6).all() and (ref <= hi + 1e-6).all()
    # uniform on [lo, hi]: mean, spread and quartiles agree with torchvision's draws and the closed form
    for d in range(4):
        width = float(hi[d] - lo[d])
        assert abs(p.factors[:, d].mean() - (lo[d] + hi[d]) / 2) < 0.01 * width
        assert abs(p.factors[:, d].std() - width / math.sqrt(12)) < 0.01 * width
        assert abs(ref[:, d].mean() - (lo[d] + hi[d]) / 2) < 0.03 * width
        for q in (0.25, 0.75):
            assert abs(torch.quantile(p.factors[:, d], q) - (lo[d] + q * width)) < 0.02 * width
    # every operation appears at every position of the order equally often
    counts = torch.stack([(p.order == op).double().mean(0) for op in range(4)])  # (op, position)
    assert (counts - 0.25).abs().max() < 5 * _se(0.25, n)
    assert (torch.sort(p.order, 1).values == torch.arange(4)).all()


def _cj_params(cj):
    params = cj.make_params([torch.zeros(3, 2, 2)])
    return (params["fn_idx"], params["brightness_factor"], params["contrast_factor"],
            params["saturation_factor"], params["hue_factor"])


def test_grayscale_and_flip_rates():
    n = 20000
    aug = BatchAugment(32, MEAN, STD)
    p = aug.sample(n, 32, 32, torch.Generator().manual_seed(5))
    assert abs(p.gray.double().mean() - 0.2) < 5 * _se(0.2, n)
    assert abs(p.flip.double().mean() - 0.5) < 5 * _se(0.5, n)
    assert not (p.gray & p.flip).double().mean().item() == 0  # independent draws


def test_grayscale_output_has_equal_channels_and_ablations_switch_parts_off():
    x = images(8)
    aug = BatchAugment(32, (0.0,) * 3, (1.0,) * 3, crop_scale=None, jitter=None, grayscale_p=1.0, flip=False)
    out = aug(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    none = BatchAugment(32, (0.0,) * 3, (1.0,) * 3, crop_scale=None, jitter=None, grayscale_p=0.0, flip=False)
    assert torch.allclose(none(x), x.float() / 255, atol=1e-6)  # identity without augmentation
    assert torch.allclose(PlainTransform(32, (0.0,) * 3, (1.0,) * 3)(x), x.float() / 255)


def test_seeded_generator_makes_augmentation_reproducible_and_independent_per_image():
    x = images(16)
    x[:] = x[0]  # the same image 16 times
    aug = BatchAugment(32, MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    diffs = [(a[0] - a[k]).abs().max().item() for k in range(1, 16)]
    assert min(diffs) > 1e-3  # every copy got its own parameters


def test_round_uint8_holds_every_view_on_8_bit_levels_and_stays_near_the_float_path():
    """--round-uint8 (the reference's PIL pipeline keeps uint8 images between operations): before normalisation
    every value of every view is k/255, and each operation moves a value by at most half a level, so the views
    stay within a few levels of the float path's."""
    from isif.data.augment import BatchAugment

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    plain = BatchAugment(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    rounded = BatchAugment(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), round_uint8=True)
    params = plain.sample(16, 32, 32, torch.Generator().manual_seed(1))
    a, b = plain.apply(imgs, params), rounded.apply(imgs, params)
    levels = b * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert not torch.allclose(a * 255, (a * 255).round(), atol=1e-4)  # the float path is not on the levels
    assert (a - b).abs().mean() < 1.5 / 255 and (a - b).abs().max() < 0.1
