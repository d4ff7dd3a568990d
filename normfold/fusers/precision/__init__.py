"""fp16 / bf16 conversion that keeps normalization statistics in fp32 ("fp32 islands").

Why: a norm's statistics are where half precision breaks. ``var = mean((x-μ)²)`` overflows fp16 as soon
as ``|x-μ| > 256`` (256² = 65536 > 65504), and ``x-μ`` cancels catastrophically when ``|μ| ≫ σ``.
TensorRT ≥ 10.12 deprecates (and 11 removes) per-layer precision on weakly typed networks; a strongly
typed network takes every tensor's type from the ONNX graph, so the only way to say "this LayerNorm runs
in fp32" is to put ``Cast(to=FLOAT)`` before it and ``Cast(to=FLOAT16)`` after it (NORMS.md §4).

The rewrite, for a low-precision type ``L`` (FLOAT16 or BFLOAT16):

* every node outside an island computes in ``L``: its FLOAT outputs are retyped to ``L``, FLOAT
  initializers and Constant tensors it reads are converted (fp16: values beyond ±65504 are clamped to
  ±65504 and values that flush to zero are counted; both are reported), ``Cast(to=FLOAT)`` becomes
  ``Cast(to=L)``;
* an island node (LayerNormalization, GroupNormalization, InstanceNormalization, BatchNormalization,
  RMSNormalization, Softmax, and the ReduceMean/Sub/Pow/Add/Sqrt/Reciprocal/Div statistics chain of a
  norm that is still decomposed) keeps FLOAT: its FLOAT inputs get ``Cast(to=FLOAT)`` and its consumers
  get ``Cast(to=L)``, one Cast per (value, type) however many consumers share it;
* ``y = Cast_L(norm(Cast_f32(x)))`` equals the fp32 norm rounded once to ``L``, so the island adds one
  rounding of the output and none to the statistics;
* ``keep_io_types``: graph inputs and outputs stay FLOAT, with Casts at the boundary.

Nodes that call a model-local function (e.g. TensorRT-plugin custom norms) and the Random* / Range ops
(whose fp16 variants do not exist) always stay FLOAT. Control flow (If/Loop/Scan) is refused: the
subgraphs capture outer values whose types this pass would change.

The automatic mode (:func:`select_fp32_islands`) starts with every island in low precision, asks a
callable for per-tensor errors against a reference, keeps in fp32 the islands whose output error
exceeds a threshold *and* grows by more than ``growth``× over their input error (the error is created
there, not inherited), and repeats until no island is added.

The GPU backends run fp16/bf16 on :func:`model_for_precision`'s cached conversion, which their callers
pass in (``SessionOptions.convert``): runtime never imports this package.
"""

from normfold.fusers.precision.api import PrecisionReport, convert_precision, model_for_precision, validate_fp32_ops
from normfold.fusers.precision.auto import AutoPrecision, AutoRound, ErrorFn, select_fp32_islands
from normfold.fusers.precision.convert_pass import ConversionIssue, Precision, PrecisionPass, PrecisionStats
from normfold.fusers.precision.islands import (
    ALWAYS_FP32_OPS,
    DECOMPOSED_NORM,
    DEFAULT_FP32_OPS,
    NORM_OPS,
    Island,
    find_islands,
)

__all__ = [
    "ALWAYS_FP32_OPS",
    "DECOMPOSED_NORM",
    "DEFAULT_FP32_OPS",
    "NORM_OPS",
    "AutoPrecision",
    "AutoRound",
    "ConversionIssue",
    "ErrorFn",
    "Island",
    "Precision",
    "PrecisionPass",
    "PrecisionReport",
    "PrecisionStats",
    "convert_precision",
    "find_islands",
    "model_for_precision",
    "select_fp32_islands",
    "validate_fp32_ops",
]
