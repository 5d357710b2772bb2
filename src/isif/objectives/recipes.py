"""The references' CIFAR-10 training recipes as isif settings, named after what defines them: the augmentations
of lightly's transforms as lightly's CIFAR-10 benchmark sets them (``docs/source/getting_started/benchmarks/
cifar10_benchmark.py``), solo-learn's CIFAR configs (``scripts/pretrain/cifar/*.yaml``), and their optimisers.
Each method's ``Recipe`` (its module) combines them with its own heads and learning rate."""

from __future__ import annotations

from typing import Any

_VIEWS = {"augment.crop_mode": "resized", "augment.flip": True, "augment.grayscale_p": 0.2, "augment.jitter_p": 0.8,
          "augment.blur_p": (0.0,)}  # every reference at 32 px: jitter with p 0.8, grey 0.2, flip, no blur

# SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0): jitter 0.5 x (0.8, 0.8, 0.8, 0.2)
LIGHTLY_SIMCLR_VIEWS: dict[str, Any] = {**_VIEWS, "augment.crop_scale": (0.08, 1.0),
                                        "augment.jitter": (0.4, 0.4, 0.4, 0.1), "augment.solarize_p": (0.0,)}
# BYOLTransform of BYOLView1/2Transform(input_size=32, gaussian_blur=0.0): solarisation 0.2 on the second view only
LIGHTLY_BYOL_VIEWS: dict[str, Any] = {**_VIEWS, "augment.crop_scale": (0.08, 1.0),
                                      "augment.jitter": (0.4, 0.4, 0.2, 0.1), "augment.solarize_p": (0.0, 0.2)}
# SimSiamTransform(input_size=32, gaussian_blur=0.0): crops from 20% of the area
LIGHTLY_SIMSIAM_VIEWS: dict[str, Any] = {**_VIEWS, "augment.crop_scale": (0.2, 1.0),
                                         "augment.jitter": (0.4, 0.4, 0.4, 0.1), "augment.solarize_p": (0.0,)}
# DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5, gaussian_blur=(0, 0, 0)): jitter
# 0.5 x (0.8, 0.8, 0.4, 0.2), solarisation 0.2 on the second global view; the global crops' area (0.4-1) is DINO's
# own view kind
LIGHTLY_DINO_VIEWS: dict[str, Any] = {**_VIEWS, "augment.jitter": (0.4, 0.4, 0.2, 0.1),
                                      "augment.solarize_p": (0.0, 0.2)}
# solo-learn vicreg.yaml: crops from 20%, jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, solarisation 0.1 on both views
SOLO_VICREG_VIEWS: dict[str, Any] = {**_VIEWS, "augment.crop_scale": (0.2, 1.0),
                                     "augment.jitter": (0.4, 0.4, 0.2, 0.1), "augment.solarize_p": (0.1,)}

# lightly's CIFAR-10 benchmark: SGD momentum 0.9, weight decay 5e-4 on every parameter, cosine over the run, no
# warm-up (its learning rate, 0.06 x B/128, is each method's Recipe.lr)
LIGHTLY_SGD: dict[str, Any] = {"optim.optimizer": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
                               "optim.exclude_bias_norm": False, "optim.schedule": "cosine",
                               "optim.warmup_epochs": 0.0}
# solo-learn's CIFAR LARS: eta 0.02, clip_lr, biases and norms excluded, weight decay 1e-4, warm-up cosine
SOLO_LARS: dict[str, Any] = {"optim.optimizer": "lars", "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
                             "optim.lars_eta": 0.02, "optim.lars_clip": True, "optim.exclude_bias_norm": True,
                             "optim.schedule": "cosine"}
