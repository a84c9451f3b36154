"""The one place gcomp's version is written.

``pyproject.toml`` reads it statically (``[tool.setuptools.dynamic]``, without importing gcomp or
torch) and ``gcomp.__version__`` re-exports it, so a release changes one line.
"""
__version__ = "0.1.0"
