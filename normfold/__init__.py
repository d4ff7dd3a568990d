"""normfold: take trained PyTorch models to production inference and prove nothing was lost."""

__version__ = "0.1.0"
