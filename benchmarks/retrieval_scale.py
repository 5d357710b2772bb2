"""Recall@K, MAP@R and NMI at Stanford Online Products' test size, on random features.

    python benchmarks/retrieval_scale.py [--n 60502] [--classes 11316] [--device cpu] [--engine torch|faiss]

Prints the seconds each metric takes, its value, and the peak memory; the features are random unit vectors with
SOP's class sizes (about 5 images a class), so the values say nothing about accuracy; they are printed so that
the engines can be compared (they must agree exactly). Run one engine per process: the peak memory is the
process's.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from isif.evaluate.engine import ENGINES
from isif.evaluate.retrieval import map_at_r, nmi, recall_at_k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60502)
    ap.add_argument("--classes", type=int, default=11316)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nmi-iters", type=int, default=20)
    ap.add_argument("--engine", choices=ENGINES, default="torch")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(a.n, a.dim, generator=g), dim=1).to(a.device)
    y = (torch.arange(a.n) % a.classes).to(a.device)
    e = a.engine
    for name, fn in (("recall@1,10,100", lambda: recall_at_k(x, y, (1, 10, 100), engine=e)),
                     ("map@r", lambda: map_at_r(x, y, engine=e)),
                     (f"nmi ({a.nmi_iters} k-means iterations)", lambda: nmi(x, y, iters=a.nmi_iters, engine=e))):
        t0 = time.perf_counter()
        value = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"{name:32s} {time.perf_counter() - t0:8.1f} s   {value}", flush=True)
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
          f"{a.n} images, {a.classes} classes, {torch.get_num_threads()} threads, device {a.device}, engine {e}")


if __name__ == "__main__":
    main()
