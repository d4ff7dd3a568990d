"""normfold.fusers: verified graph passes on onnx_ir (BatchNorm/affine folding, norm fusion).

Importing this package registers every pass in :data:`PASS_REGISTRY`; :func:`optimize` runs them.
"""

from normfold.fusers import affine as _affine  # noqa: F401  (registers fold_affine)
from normfold.fusers import batchnorm as _batchnorm  # noqa: F401  (registers the BN passes)
from normfold.fusers import groupnorm, layernorm  # noqa: F401  (register fuse_groupnorm, fuse_layernorm)
from normfold.fusers.base import PASS_REGISTRY, NormfoldPass, PassContext, RuleEvent, register_pass
from normfold.fusers.pipeline import default_passes, optimize, run_pipeline
from normfold.fusers.report import OptimizeReport, RuleSummary, VerificationReport

__all__ = [
    "PASS_REGISTRY",
    "NormfoldPass",
    "OptimizeReport",
    "PassContext",
    "RuleEvent",
    "RuleSummary",
    "VerificationReport",
    "default_passes",
    "optimize",
    "register_pass",
    "run_pipeline",
]
