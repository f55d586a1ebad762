"""Forward SDEs dY = f(Y, t) dt + g(t) dB with Gaussian marginals: the VP, VE and sub-VP SDEs and the
registry of SDEs (:mod:`~sdeflow.sdes.linear`), and the VP SDEs of discrete-time models' noise
levels, improved DDPM's cosine and any table of β (:mod:`~sdeflow.sdes.noise_levels`)."""

from .linear import (SDE, SDES, VESDE, VPSDE, SubVPSDE, make_sde, noise_level_time, register_sde, sde_config,
                     sde_parameters)
from .noise_levels import CosineVPSDE, DiscreteVPSDE

__all__ = ["SDE", "VPSDE", "VESDE", "SubVPSDE", "SDES", "make_sde", "register_sde", "sde_config", "sde_parameters",
           "noise_level_time",
           "CosineVPSDE", "DiscreteVPSDE"]
