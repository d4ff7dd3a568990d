"""normfold.serve: serving artifacts (a Triton model repository)."""

from __future__ import annotations

from normfold.serve.triton import TritonRepoReport, TritonTensor, write_triton_repo

__all__ = ["TritonRepoReport", "TritonTensor", "write_triton_repo"]
