"""normfold.fusers."""

from normfold.fusers import groupnorm, layernorm  # noqa: F401  (register the passes)
