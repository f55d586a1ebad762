"""sdeflow: continuous-time diffusion models you can measure.

The method in three modules: forward SDEs (:mod:`sdeflow.sdes`), the plug-in reverse SDE with its
loss, ELBO and exact likelihood (:mod:`sdeflow.model`), and samplers (:mod:`sdeflow.samplers`).
"""

from .sdes import SDE, VPSDE, VESDE, SubVPSDE
from .model import PluginReverseSDE
from .time_sampling import FittedTime, ImportanceTime, TimeProposal, UniformTime
from .divergence import divergence
from .samplers import METHODS, SCHEDULES, Method, Option, register_method, sample, sample_ode, time_grid
from .conditional import denoise, inpaint, posterior_sample

__version__ = "0.1.0"

__all__ = [
    "SDE", "VPSDE", "VESDE", "SubVPSDE", "PluginReverseSDE",
    "TimeProposal", "UniformTime", "ImportanceTime", "FittedTime", "divergence",
    "sample", "sample_ode", "time_grid", "METHODS", "SCHEDULES", "Method", "Option", "register_method",
    "denoise", "inpaint", "posterior_sample",
]
