"""The sampling loop: :func:`sample` runs a :class:`~sdeflow.samplers.settings.SamplerSettings` with the
method it names; :class:`Trace` keeps what it reports."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch

from ..utils import model_device_dtype
from .clipping import ClippedModel
from .grids import check_times, time_grid
from .registry import METHODS
from .settings import SamplerSettings

if TYPE_CHECKING:
    from ..model import PluginReverseSDE

__all__ = ["sample", "Trace"]


@torch.no_grad()
def sample(model: PluginReverseSDE, shape, settings: SamplerSettings | None = None, *,
           x_T: torch.Tensor | None = None, t_start: float | None = None, times=None,
           project: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
           generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
           device=None, dtype=None) -> torch.Tensor:
    r"""Samples of shape ``shape`` (B, ...): the λ-family integrated from ``t_start`` (default T) to
    t_min by ``settings`` (default :class:`SamplerSettings`\ (): 1000 Euler–Maruyama steps of the
    reverse SDE, λ = 0, to t = 0). On the grid :math:`t_0 > \dots > t_N` of
    :func:`~sdeflow.samplers.grids.time_grid`, :math:`x_{i+1} = \mathrm{step}(x_i, t_i, t_{i+1})`, the
    step being the method's (see :mod:`sdeflow.samplers.methods`). ``times``: an explicit grid instead,
    decreasing times in [0, T] (:func:`~sdeflow.samplers.grids.check_times`; its length sets the steps,
    its first time the start and its last t_min), e.g. a trained model's own steps.

    Starts from ``x_T`` if given, else from a prior draw with ``generator``, which also draws every
    noise, so a seed reproduces the batch. ``project(x, t_next)``, if given, replaces the state
    after every step (inpainting re-imposes the observed values with it). ``callback`` is called
    after every step with {"i": step index, "t": t_{i+1}, "x": the state, "nfe": network
    evaluations so far}. ``device``/``dtype`` default to the model's parameters'. With
    ``settings.clip`` every step reads the model through :class:`ClippedModel` (x̂₀ clipped, or
    thresholded at ``settings.threshold``, into the range).
    Raises ``ValueError`` for settings that :meth:`SamplerSettings.validate` refuses.
    """
    settings = _settings(settings)
    if times is not None:
        if t_start is not None:
            raise ValueError("give t_start or times, not both: times[0] is where the run starts")
        times = check_times(times, model.T)
        # The times replace the grid (so no grid's own rule on t_min applies), the steps and t_min.
        settings = dataclasses.replace(settings, n_steps=len(times) - 1, t_min=float(times[-1]), grid="uniform")
        t_start = float(times[0])
    settings = settings.validate(model.T, t_start)
    step = METHODS[settings.method].step
    if settings.clip is not None:
        model = ClippedModel(model, settings.clip, settings.threshold)
    device, dtype = model_device_dtype(model, device, dtype)
    ts = (time_grid(model.sde, settings.n_steps, settings.grid, settings.t_min, t_start, device=device, dtype=dtype)
          if times is None else times.to(device=device, dtype=dtype))
    x = model.sde.prior_sample(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    state = dict(settings.options)
    nfe = 0
    for i in range(settings.n_steps):
        t, t_next = ts[i].expand(x.shape[0]), ts[i + 1].expand(x.shape[0])
        x, step_nfe = step(model, x, t, t_next, settings.lmbd, generator, i == settings.n_steps - 1, state)
        nfe += step_nfe
        if project is not None:
            x = project(x, t_next)
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x, "nfe": nfe})
    return x


def _settings(settings) -> SamplerSettings:
    if settings is None:
        return SamplerSettings()
    if not isinstance(settings, SamplerSettings):
        raise ValueError(f"settings must be a sdeflow.samplers.SamplerSettings or None; got {type(settings).__name__}")
    return settings


class Trace:
    """A callback for :func:`sample`, :func:`sdeflow.likelihood.ode.sample_ode` and the conditional samplers
    that keeps what they report: ``nfe`` (network evaluations of the run so far), ``times`` (the
    time of each report, floats) and, with ``keep_states``, ``states`` (the state at each report,
    on its device). ``last`` is the last report as given."""

    def __init__(self, keep_states: bool = False):
        self.keep_states = keep_states
        self.nfe = 0
        self.times: list[float] = []
        self.states: list[torch.Tensor] = []
        self.last: dict = {}

    def __call__(self, report: dict) -> None:
        self.last = report
        self.nfe = report["nfe"]
        self.times.append(float(report["t"]))
        if self.keep_states:
            self.states.append(report["x"])
