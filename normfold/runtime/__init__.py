"""normfold.runtime."""
