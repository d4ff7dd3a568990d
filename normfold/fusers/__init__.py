"""normfold.fusers."""
