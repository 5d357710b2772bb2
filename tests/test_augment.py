"""Batched augmentation: exact per-image equality with torchvision's functional ops for the same
parameters, and parameter distributions that match torchvision's own samplers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from isif.base.settings import check_fields
from isif.data.augment import (
    AugmentConfig,
    BatchAugment,
    CropParams,
    PlainTransform,
    build_transforms,
    resized_crop,
    sample_crop_params,
    sample_jitter_params,
    view_augment,
)
from isif.data.pixels import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
)
from isif.data.types import ArrayDataset, Splits

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


# ----------------------------------------------------------------------------- RandomApply(jitter), blur, solarisation

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def colour_only(**kw):
    """No crop, flip, jitter or grey (unless asked), identity normalisation: only the part under test acts."""
    base = dict(crop_scale=None, jitter=None, grayscale_p=0.0, flip=False)
    size = kw.pop("size", 32)
    return BatchAugment(size, ZERO, ONE, **{**base, **kw})


def test_default_configuration_draws_exactly_as_before():
    """Numbers written by the code before jitter_p, blur and solarisation existed: the defaults (and the new parts
    set off explicitly) consume the generator exactly as it did, so old runs resume bit-exactly."""
    for aug in (BatchAugment(32, MEAN, STD),
                BatchAugment(32, MEAN, STD, jitter_p=1.0, blur_p=0.0, solarize_p=0.0, blur_sigma=(0.5, 1.0))):
        g = torch.Generator().manual_seed(123)
        p = aug.sample(4, 32, 32, g)
        assert p.crop.top.tolist() == [10, 2, 5, 1] and p.crop.left.tolist() == [5, 12, 10, 2]
        assert p.crop.height.tolist() == [20, 18, 19, 31] and p.crop.width.tolist() == [25, 16, 22, 23]
        assert p.jitter.factors[:, 0].tolist() == pytest.approx(
            [0.6165014505386353, 0.9755679368972778, 0.6913641691207886, 1.2826333045959473], abs=1e-7)
        assert p.jitter.factors[:, 3].tolist() == pytest.approx(
            [0.06839841604232788, -0.353225439786911, 0.2063140571117401, -0.3895271420478821], abs=1e-7)
        assert p.jitter.order.tolist() == [[2, 3, 0, 1], [1, 3, 0, 2], [3, 0, 1, 2], [0, 1, 2, 3]]
        assert p.gray.tolist() == [False] * 4 and p.flip.tolist() == [False, True, False, True]
        assert p.jitter.on is None and p.blur is None and p.blur_sigma is None and p.solarize is None
        assert torch.rand(2, generator=g).tolist() == [0.7398367524147034, 0.22876781225204468]
        # and the same as a replay of the old draw sequence, to the last bit of the generator's state
        n, old = 50, torch.Generator().manual_seed(8)
        for shape, dtype in [((n, 10), torch.float64)] * 2 + [((2, n), torch.float64), ((n, 4), torch.float32),
                                                             ((n, 4), torch.float32), ((n,), torch.float32),
                                                             ((n,), torch.float32)]:
            torch.rand(*shape, generator=old, dtype=dtype)
        new = torch.Generator().manual_seed(8)
        aug.sample(n, 32, 32, new)
        assert torch.equal(new.get_state(), old.get_state())


def test_new_parts_draw_after_the_papers_and_leave_its_draws_alone():
    a = BatchAugment(32, MEAN, STD).sample(16, 32, 32, torch.Generator().manual_seed(2))
    b = BatchAugment(32, MEAN, STD, jitter_p=0.8, blur_p=0.5, solarize_p=0.2).sample(
        16, 32, 32, torch.Generator().manual_seed(2))
    for name in ("top", "left", "height", "width"):
        assert torch.equal(getattr(a.crop, name), getattr(b.crop, name))
    assert torch.equal(a.jitter.factors, b.jitter.factors) and torch.equal(a.jitter.order, b.jitter.order)
    assert torch.equal(a.gray, b.gray) and torch.equal(a.flip, b.flip)
    half = b.select(slice(4, 12))  # a process's share keeps every part
    assert half.jitter.on.shape == half.blur.shape == half.blur_sigma.shape == half.solarize.shape == (8,)
    assert torch.equal(half.blur_sigma, b.blur_sigma[4:12])


@pytest.mark.parametrize("side, k", [(10, 3), (32, 3), (40, 5), (64, 7), (96, 9), (224, 23), (227, 23)])
def test_blur_kernel_is_the_odd_integer_nearest_a_tenth_of_the_side(side, k):
    assert blur_kernel_size(side) == k
    if side >= 30:
        odd = torch.arange(1, 100, 2).double()
        assert k == int(odd[torch.argmin((odd - 0.1 * side - 1e-9).abs())])  # ties (40 px: 3 or 5) go up


@pytest.mark.parametrize("side", [32, 64, 96])
def test_blur_equals_torchvision_gaussian_blur_per_image(side):
    aug = colour_only(size=side, blur_p=0.5)
    x = images(12, size=side)
    params = aug.sample(12, side, side, torch.Generator().manual_seed(side))
    out = aug.apply(x, params)
    k = blur_kernel_size(side)
    assert params.blur.any() and not params.blur.all()
    for i in range(12):
        img = x[i].float() / 255
        if params.blur[i]:
            s = float(params.blur_sigma[i])
            assert 0.1 <= s <= 2.0
            ref = TF.gaussian_blur(img, [k, k], [s, s])
            if s > 0.5:
                assert (out[i] - img).abs().max() > 1e-2  # it did blur
        else:
            ref = img
        assert (out[i] - ref).abs().max() < 1e-5, i


def test_blur_with_a_kernel_wider_than_small_images_reflects_as_torchvision():
    x = images(3, size=8).float() / 255
    sigma = torch.tensor([0.3, 1.0, 5.0])
    out = gaussian_blur(x.clone(), sigma, 7)
    for i in range(3):
        assert (out[i] - TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2)).abs().max() < 1e-5


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_equals_torchvision(threshold):
    aug = colour_only(solarize_p=0.5, solarize_threshold=threshold)
    x = images(16)
    params = aug.sample(16, 32, 32, torch.Generator().manual_seed(6))
    out = aug.apply(x, params)
    assert params.solarize.any() and not params.solarize.all()
    for i in range(16):
        img = x[i].float() / 255
        assert torch.equal(out[i], TF.solarize(img, threshold) if params.solarize[i] else img), i
    if threshold == 0.5:  # on 8-bit levels, 0.5 is PIL's solarize(128): values >= 128 inverted
        on = params.solarize
        assert torch.equal((out[on] * 255).round().to(torch.uint8), TF.solarize(x[on], 128))


def test_jitter_p_jitters_exactly_the_images_whose_coin_is_on():
    x = images(32)
    aug = BatchAugment(32, ZERO, ONE, jitter_p=0.5)
    params = aug.sample(32, 32, 32, torch.Generator().manual_seed(9))
    on = params.jitter.on
    assert on.any() and not on.all()
    out = aug.apply(x, params)
    always = BatchAugment(32, ZERO, ONE).apply(x, dataclasses.replace(params, jitter=dataclasses.replace(
        params.jitter, on=None)))
    never = BatchAugment(32, ZERO, ONE, jitter=None).apply(x, dataclasses.replace(params, jitter=None))
    assert (out[on] - always[on]).abs().max() < 1e-6
    assert (out[~on] - never[~on]).abs().max() < 1e-6
    assert (always[~on] - never[~on]).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the off images would have changed


def test_probabilities_of_jitter_blur_and_solarisation():
    n = 20000
    aug = BatchAugment(32, MEAN, STD, jitter_p=0.8, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    p = aug.sample(n, 32, 32, torch.Generator().manual_seed(10))
    assert abs(p.jitter.on.double().mean() - 0.8) < 5 * _se(0.8, n)
    assert abs(p.blur.double().mean() - 0.5) < 5 * _se(0.5, n)
    assert abs(p.solarize.double().mean() - 0.2) < 5 * _se(0.2, n)
    assert abs((p.blur & p.solarize).double().mean() - 0.1) < 5 * _se(0.1, n)  # independent coins
    s = p.blur_sigma
    assert s.min() >= 0.1 and s.max() <= 2.0
    assert abs(s.mean() - 1.05) < 0.01 and abs(s.std() - 1.9 / math.sqrt(12)) < 0.01  # uniform on [0.1, 2]


def test_round_uint8_holds_blurred_and_solarised_views_on_8_bit_levels():
    x = images(16)
    aug = BatchAugment(32, ZERO, ONE, round_uint8=True, blur_p=1.0, solarize_p=0.5)
    out = aug(x, torch.Generator().manual_seed(11))
    levels = out * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_view_augment_picks_each_views_probabilities():
    base = BatchAugment(32, MEAN, STD, blur_p=0.3)
    cfg = AugmentConfig(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    v1, v2 = view_augment(base, cfg, 0), view_augment(base, cfg, 1)
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert base.blur_p == 0.3 and base.solarize_p == 0.0 and v1.size == base.size  # a copy; the base is as it was
    one = AugmentConfig(blur_p=(0.5,), solarize_p=(0.1,))
    assert all((view_augment(base, one, v).blur_p, view_augment(base, one, v).solarize_p) == (0.5, 0.1)
               for v in (0, 1, 5))
    v3 = view_augment(base, AugmentConfig(solarize_p=(0.0, 0.2, 0.1)), 5)  # past the end: the last value
    assert (v3.blur_p, v3.solarize_p) == (0.0, 0.1)
    with pytest.raises(ValueError, match="--blur-p: no value for view -1"):
        view_augment(base, cfg, -1)


def test_build_transforms_passes_the_new_settings_through():
    train = ArrayDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), ["a"])
    cfg = AugmentConfig(jitter_p=0.8, blur_p=(1.0, 0.1), blur_sigma=(0.2, 1.5), solarize_p=(0.0, 0.2),
                        solarize_threshold=0.4)
    aug, _ = build_transforms(cfg, None, Splits(train, None, MEAN, STD))
    assert (aug.jitter_p, aug.blur_p, aug.blur_sigma, aug.solarize_p, aug.solarize_threshold) == (
        0.8, 1.0, (0.2, 1.5), 0.0, 0.4)


@pytest.mark.parametrize("kw, message", [
    ({"solarize_p": (1.5,)}, r"--solarize-p must be in \[0, 1\], got 1.5"),
    ({"blur_p": (0.5, -0.1)}, r"--blur-p must be in \[0, 1\], got -0.1"),
    ({"blur_p": ()}, "--blur-p needs one value"),
    ({"jitter_p": 1.2}, r"--jitter-p must be in \[0, 1\]"),
    ({"blur_sigma": (0.0, 1.0)}, "--blur-sigma must satisfy 0 < min <= max"),
    ({"blur_sigma": (2.0, 1.0)}, "--blur-sigma must satisfy 0 < min <= max"),
    ({"solarize_threshold": 1.5}, r"--solarize-threshold must be in \[0, 1\]"),
])
def test_augment_config_check_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kw).check()
    with pytest.raises(ValueError):
        check_fields(AugmentConfig(**kw))
    check_fields(AugmentConfig())
