"""Adapters for training frameworks that build the ``DistributedDataParallel`` wrapper themselves.

- :mod:`gcomp.integrations.lightning`: ``GcompCallback`` for PyTorch Lightning (extra ``[lightning]``).
- :mod:`gcomp.integrations.accelerate`: ``register(accelerator, model, method, **options)`` for
  Hugging Face Accelerate (extra ``[accelerate]``).

Each submodule imports its framework, so import the submodule you use; ``import gcomp`` and
``import gcomp.integrations`` import neither framework.
"""
