"""Model zoo and model references (``zoo:NAME``, ``file.py:factory``, ``pkg.module:factory``)."""

from normfold.models import zoo as _zoo  # noqa: F401  (registers the built-in models)
from normfold.models.registry import ZOO, InputSpec, ZooEntry, register, seeded_inputs

__all__ = ["ZOO", "InputSpec", "ZooEntry", "register", "seeded_inputs"]
