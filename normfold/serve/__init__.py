"""normfold.serve."""
