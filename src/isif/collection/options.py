"""The fields every collection command's options share, and the options of ``isif eval`` and ``isif plot``.

A collection command's options dataclass lives in its own module (``embedding.EmbedOptions``,
``duplicates.DuplicatesOptions``, ...; docs/extending.md). A field gives the flag (or argument), its default, its
help and its check (``isif.base.settings.check_fields``); a field without a default is required. Checks that need
the data (``--k`` against the number of images, ``--threshold`` of a cosine) stay with the functions that read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.settings import POSITIVE, at_least, each, one_of, setting

_EMBED_DIR = "an `isif embed` output folder (features.npy, paths.txt, index.json)"


def checkpoint_arg() -> str:
    return setting(help="a .pt file or a run folder", positional=True)


def embed_dir_arg() -> str:
    return setting(help=_EMBED_DIR, positional=True, metavar="EMBED_DIR")


def tile_setting(default: int, what: str = "thumbnail side in pixels") -> int:
    return setting(default, what, check=at_least(16))


# ----------------------------------------------------------------------------- eval and plot


@dataclass(kw_only=True)
class CheckpointOptions:
    """What every ``isif eval`` protocol takes."""

    checkpoint: str = setting(help="a .pt file, or a run folder (uses checkpoints/last.pt)")
    data: str | None = setting(None, "dataset path, if it moved since training; for a run on unlabelled images, "
                                     "the labelled images to evaluate on (default its --eval-data)")
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    json: bool = setting(False, "print one JSON object")


@dataclass(kw_only=True)
class KnnOptions(CheckpointOptions):
    k: int | None = setting(None, "neighbours (default: the run's, 200)", check=at_least(1))
    sigma: float | None = setting(None, "vote temperature (default: the run's, 0.1)", check=POSITIVE)


@dataclass(kw_only=True)
class RetrievalOptions(CheckpointOptions):
    ks: tuple[int, ...] | None = setting(None, "comma-separated K for Recall@K (default: the run's; 1,2,4,8, or "
                                               "1,10,100 for SOP)", check=each(at_least(1)))
    seed: int = setting(0, "k-means seed for NMI")

    def sorted_ks(self) -> tuple[int, ...] | None:
        return tuple(sorted(set(self.ks))) if self.ks else None


@dataclass(kw_only=True)
class LinearOptions(CheckpointOptions):
    features: str = setting("backbone", "pooled backbone features or the 128-d embedding",
                            check=one_of("backbone", "embedding"))
    epochs: int = setting(100, "probe epochs", check=at_least(1))
    lr: float = setting(0.1, "probe learning rate, cosine schedule", check=POSITIVE)


@dataclass(kw_only=True)
class SimilarityOptions:
    run: str = setting(help="a run folder or checkpoint", positional=True)
    compare: list[str] = setting(help="another run to overlay (repeatable)", factory=list, metavar="RUN")
    out: str | None = setting(None, "PNG path (default RUN/similarity.png)")
    images: int = setting(5000, "test images used", check=at_least(2))
    data: str | None = setting(None, "dataset path, if it moved since training")
    device: str | None = setting(None, "auto, cpu, cuda or cuda:N (default auto)")
    seed: int = setting(0, "seed of the images drawn and of their augmented views")

