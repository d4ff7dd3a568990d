"""Built-in zoo models (see :mod:`normfold.models.registry`)."""
