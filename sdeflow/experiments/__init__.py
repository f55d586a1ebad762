"""Applications composed from the library: configuration and composition only.

:mod:`sdeflow.experiments.images` (U-Net models of image data sets) and
:mod:`sdeflow.experiments.toy` (the 2-D toy example) both train with :func:`sdeflow.engine.fit`
and measure with :mod:`sdeflow.likelihood.evaluation`.
"""
