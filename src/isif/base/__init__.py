"""The bottom layer: errors, files, settings, devices, processes, faults, optional extras; and the version."""

__version__ = "0.1.0"  # the package's version (pyproject.toml has the same); ``isif.__version__`` re-exports it
