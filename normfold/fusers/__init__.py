"""normfold.fusers: verified graph passes on onnx_ir (BatchNorm/affine folding, norm fusion).

Importing this package registers every pass in :data:`PASS_REGISTRY`; :func:`optimize` runs them. A new
rewrite is one :class:`Rule` subclass decorated with :func:`register_rule` (see :mod:`normfold.fusers.base`).
"""

from normfold.fusers import affine as _affine  # noqa: F401  (registers fold_affine)
from normfold.fusers import batchnorm as _batchnorm  # noqa: F401  (registers the BN rules)
from normfold.fusers import gather as _gather  # noqa: F401  (registers fold_constant_gather)
from normfold.fusers import gemm as _gemm  # noqa: F401  (registers matmul_add_to_gemm)
from normfold.fusers import groupnorm, layernorm, rmsnorm  # noqa: F401  (register the norm fusions)
from normfold.fusers import neutral as _neutral  # noqa: F401  (registers drop_neutral_ops)
from normfold.fusers import reshape as _reshape  # noqa: F401  (registers collapse_reshapes)
from normfold.fusers.base import (
    PASS_REGISTRY,
    NormfoldPass,
    PassContext,
    Reject,
    Rule,
    RuleEvent,
    RulePass,
    Scope,
    Site,
    register_pass,
    register_rule,
)
from normfold.fusers.pipeline import default_passes, optimize, run_pipeline
from normfold.fusers.report import OptimizeReport, RuleSummary, VerificationReport

__all__ = [
    "PASS_REGISTRY",
    "NormfoldPass",
    "OptimizeReport",
    "PassContext",
    "Reject",
    "Rule",
    "RuleEvent",
    "RulePass",
    "RuleSummary",
    "Scope",
    "Site",
    "VerificationReport",
    "default_passes",
    "optimize",
    "register_pass",
    "register_rule",
    "run_pipeline",
]
