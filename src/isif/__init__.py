"""isif: unsupervised embedding learning via Invariant and Spreading Instance Feature."""

__version__ = "0.1.0"
