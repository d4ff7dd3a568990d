"""normfold.bench."""
