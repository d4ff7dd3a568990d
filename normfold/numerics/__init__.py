"""normfold.numerics."""
