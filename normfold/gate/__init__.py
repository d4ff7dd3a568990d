"""normfold.gate."""
