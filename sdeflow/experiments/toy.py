r"""The 2-D toy example: train a plug-in reverse SDE on a toy data set with the one loop, measure it
with :mod:`sdeflow.likelihood.evaluation`, and draw it. ``sdeflow swissroll`` and ``examples/swissroll.py``
only parse arguments and call :func:`run_toy`.

Training (:func:`sdeflow.engine.fit`) minimises the DSM loss on fresh data each step; by default
with the likelihood weighting g²/v and times drawn ∝ g²/v (uniform in log-SNR), which makes the loss
the ELBO's own DSM form and so keeps the bound tight (Adam, warm-up then cosine decay of the learning
rate, an EMA of the weights, which is the model that is evaluated). The last
``second_order_fraction`` of the steps add second-order score matching (``dsm(order=2)``, Lu et al.
2022), which fits the Jacobian of the score as well: the probability-flow ODE's likelihood depends
on it. Every ``monitor_every`` steps the EMA model's ELBO is estimated on a fresh batch, so the
progress bar and ``training.png`` show the bound improving. Checkpoints go to the output folder, so
a run can be resumed like an image run.

Evaluation (:func:`evaluate_toy`), all on fresh data:

- ``elbo_nats``/``elbo_se``: the test ELBO per point (exact divergence, a time proposal fitted on
  every test point), ``n_slices`` time draws each; its standard error over points.
- ``ode_logp_nats``/``ode_logp_se``: the probability-flow ODE log-likelihood (exact divergence).
- ``true_logp_nats``, ``elbo_gap_nats`` = E[log p − ELBO], ``ode_gap_nats`` = E[log p − log p_ODE]
  with paired standard errors, where the data set has an exact density.
- ``swd_lmbd<λ>``: sliced Wasserstein-1 distance between ``n_samples`` samples of the λ-process and
  as many fresh data points; ``swd_floor``: the same between two independent data sets (mean over
  five pairs). All use the same projections.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ..storage.files import atomic_write_bytes
from ..config import build_model, model_config
from ..training import TrainConfig
from ..data import get_dataset
from ..engine.hooks import LOG_NAME, read_log
from ..engine.state import STREAM_MONITOR, STREAM_MONITOR_DATA, make_generator, step_seed
from ..likelihood.elbo import elbo, fit_time_proposal
from ..likelihood.evaluation import LikelihoodSettings, log_likelihood
from ..likelihood.statistics import mean_se
from ..metrics import sliced_wasserstein
from ..plotting import lmbd_key, plot_points, plot_samples, plot_training, plot_trajectories
from ..samplers import SamplerSettings, Trace, sample
from ..utils import check_fraction, check_positive_float, check_positive_int

__all__ = ["ToyConfig", "ToyEvalConfig", "toy_train_config", "make_toy_model", "train_toy", "evaluate_toy",
           "run_toy", "write_metrics", "OUTPUT_FILES"]

#: Files :func:`run_toy` writes for the default λ = 0, 1 (besides checkpoints and metrics.jsonl).
OUTPUT_FILES = ("samples.png", "trajectories_lmbd0.png", "trajectories_lmbd1.png", "training.png",
                "metrics.json")

#: Independent pairs of data sets averaged into ``swd_floor``.
SWD_FLOOR_PAIRS = 5

#: The toy example's training recipe (see the README): every other setting is TrainConfig's default.
TOY_TRAINING = dict(steps=8000, batch_size=512, lr=3e-3, warmup_steps=200, lr_schedule="cosine",
                    final_lr_fraction=0.02, grad_clip=None, ema_decay=0.998, second_order_fraction=0.125,
                    monitor_every=200, monitor_batch=256, monitor_slices=4, checkpoint_every=2000, log_every=10)


def toy_train_config(**overrides) -> TrainConfig:
    """The toy example's :class:`TrainConfig`, with ``overrides``."""
    return TrainConfig(**{**TOY_TRAINING, **overrides})


def _toy_net() -> dict:
    return {"name": "mlp", "dim": 2, "hidden": 128, "n_blocks": 2, "fourier_features": 16, "fourier_scale": 0.25}


@dataclass
class ToyEvalConfig:
    """How the toy example measures a trained model (see the module docstring)."""
    lmbds: tuple[float, ...] = (0.0, 1.0)
    n_steps: int = 500
    n_samples: int = 5000
    n_trajectories: int = 150
    n_likelihood: int = 1000
    n_slices: int = 128
    swd_projections: int = 200
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5

    def validate(self) -> "ToyEvalConfig":
        for name in ("n_steps", "n_samples", "n_trajectories", "n_likelihood", "n_slices", "swd_projections"):
            check_positive_int(name, getattr(self, name))
        if not self.lmbds:
            raise ValueError("lmbds must hold at least one value in [0, 1]")
        for lmbd in self.lmbds:
            check_fraction("lmbds", lmbd, "(0: reverse SDE, 1: probability-flow ODE)")
        for name in ("ode_rtol", "ode_atol"):
            check_positive_float(name, getattr(self, name))
        return self


@dataclass
class ToyConfig:
    """The toy example: data set, SDE, network, parameterization, training and evaluation."""
    dataset: str = "swissroll"
    sde: dict = field(default_factory=lambda: {"name": "vp"})
    net: dict = field(default_factory=_toy_net)
    parameterization: str = "score"
    train: TrainConfig = field(default_factory=toy_train_config)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)
    device: str = "cpu"

    def validate(self) -> "ToyConfig":
        """Raise ``ValueError`` naming the first bad setting; return self."""
        dataset = get_dataset(self.dataset)
        if dataset.kind != "toy":
            raise ValueError(f"dataset must be a toy data set (points, not images); got {self.dataset!r}")
        self.train.validate()
        self.eval.validate()
        self.model_config()
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda'; got {self.device!r}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        return self

    def model_config(self) -> dict:
        """The model configuration stored in the run's checkpoints."""
        return model_config(dataset=self.dataset, net=self.net, sde=self.sde, parameterization=self.parameterization)

    def to_dict(self) -> dict:
        """Every setting in one flat dict of plain types (training and evaluation fields side by side)."""
        parts = dataclasses.asdict(self)
        flat = {key: value for key, value in parts.items() if key not in ("train", "eval")}
        flat.update(parts["train"])
        flat.update(parts["eval"])
        return json.loads(json.dumps(flat))


def make_toy_model(config: ToyConfig):
    """The configured SDE and MLP as a :class:`PluginReverseSDE` on ``config.device``."""
    return build_model(config.model_config()).to(config.device)


def _elbo_estimate(config: ToyConfig):
    """The monitor's estimate: the EMA model's mean ELBO on a fresh batch, exact divergence, with a
    time proposal refitted to that batch (its sharp-edged points dominate the variance otherwise)."""
    sample_data = get_dataset(config.dataset).sample
    train = config.train

    def estimate(ema_model, step: int) -> float:
        gen = make_generator(config.device, step_seed(train.seed, step, 0, stream=STREAM_MONITOR))
        # The data's own stream: a CPU generator seeded like ``gen`` would repeat its numbers.
        x = sample_data(train.monitor_batch, generator=make_generator("cpu", step_seed(train.seed, step, 0,
                                                                                         stream=STREAM_MONITOR_DATA)))
        x = x.to(config.device)
        with torch.no_grad():
            proposal = fit_time_proposal(ema_model, x, max_examples=x.shape[0], divergence="exact", generator=gen)
            return float(elbo(ema_model, x, n_slices=train.monitor_slices, time_sampling=proposal,
                              divergence="exact", generator=gen).mean())
    return estimate


def history_from_log(run_dir) -> dict:
    """{"step", "loss", "elbo_step", "elbo", "running_elbo"} as lists, from ``metrics.jsonl``."""
    history = {"step": [], "loss": [], "elbo_step": [], "elbo": [], "running_elbo": []}
    for record in read_log(os.path.join(run_dir, LOG_NAME)):
        if record.get("event") == "elbo":
            history["elbo_step"].append(record["step"])
            history["elbo"].append(record["elbo"])
            history["running_elbo"].append(record["running_elbo"])
        elif "event" not in record and record.get("loss") is not None:
            history["step"].append(record["step"])
            history["loss"].append(record["loss"])
    return history


def _sample_figure(config: ToyConfig):
    """The figure of :class:`~sdeflow.engine.SampleFigures`: EMA samples (reverse SDE, Euler) over data."""
    train, sample_data = config.train, get_dataset(config.dataset).sample

    def draw(ema_model, path, step):
        gen = make_generator(config.device, step_seed(train.seed, step, 0, stream=STREAM_MONITOR))
        points = sample(ema_model, (train.sample_n_samples, 2), SamplerSettings(n_steps=train.sample_n_steps),
                        generator=gen, device=config.device)
        data = sample_data(5000, generator=make_generator("cpu", step_seed(train.seed, step, 0,
                                                                           stream=STREAM_MONITOR_DATA)))
        plot_points(points, path, f"{config.dataset}: EMA samples at step {step} ({train.sample_n_steps} Euler "
                                  f"steps, λ=0)", reference=data)
    return draw


def train_toy(model, config: ToyConfig, run_dir, *, resume: bool = False, hooks=()) -> tuple:
    """Train ``model`` with :func:`sdeflow.engine.fit` on fresh batches of the data set, writing
    checkpoints, ``metrics.jsonl`` and, every ``sample_every`` steps, ``samples-<step>.png`` into
    ``run_dir``. Returns (EMA model in eval mode, history from :func:`history_from_log`, fit's result)."""
    from ..engine import ElboMonitor, JSONLLog, SampleFigures, StreamBatches, fit

    config.validate()
    batches = StreamBatches(get_dataset(config.dataset).sample, config.train.batch_size, config.train.seed)
    own = [JSONLLog(), ElboMonitor(_elbo_estimate(config)), SampleFigures(_sample_figure(config))]
    result = fit(model, batches, config.train, run_dir, config.model_config(), resume=resume,
                 device=config.device, hooks=[*own, *hooks])
    return result["ema_model"].eval(), history_from_log(run_dir), result


def _likelihoods(model, x: torch.Tensor, config: ToyConfig, seed: int) -> dict:
    ev = config.eval
    # Chunks of ~16k rows (points × slices) bound the memory of the divergence's graph; the proposal is
    # fitted on every point (well under a second in 2-D), so it sees the rare points near a sharp edge.
    bound = log_likelihood(model, x, settings=LikelihoodSettings(n_slices=ev.n_slices, divergence="exact",
                                                                 fit_examples=x.shape[0]),
                           seed=seed, batch_size=max(1, 16384 // ev.n_slices))
    ode = log_likelihood(model, x, settings=LikelihoodSettings(bound="ode", divergence="exact", rtol=ev.ode_rtol,
                                                               atol=ev.ode_atol), seed=seed, batch_size=x.shape[0])
    metrics = {}
    metrics["elbo_nats"], metrics["elbo_se"] = bound["mean"], bound["se"]
    metrics["ode_logp_nats"], metrics["ode_logp_se"] = ode["mean"], ode["se"]
    metrics["ode_nfe"] = ode["nfe"]
    metrics["elbo_minus_ode_nats"], metrics["elbo_minus_ode_se"] = mean_se(bound["per_example"] - ode["per_example"])
    log_prob = get_dataset(config.dataset).log_prob
    if log_prob is not None:
        true_logp = log_prob(x.cpu()).double()
        metrics["true_logp_nats"], metrics["true_logp_se"] = mean_se(true_logp)
        metrics["elbo_gap_nats"], metrics["elbo_gap_se"] = mean_se(true_logp - bound["per_example"])
        metrics["ode_gap_nats"], metrics["ode_gap_se"] = mean_se(true_logp - ode["per_example"])
    return metrics


def evaluate_toy(model, config: ToyConfig, generator: torch.Generator,
                 data_generator: torch.Generator | None = None) -> tuple[dict, dict]:
    """Measure ``model`` on fresh data (see the module docstring). ``generator`` draws the samplers'
    noise on the model's device, ``data_generator`` (CPU, default ``generator``) the data; the
    likelihoods' own noise is seeded by ``config.train.seed``.

    Returns (metrics, artefacts): metrics is a flat dict of floats; artefacts holds the tensors the
    figures need: "data" (n_samples, 2), "samples" {λ: (n_samples, 2)}, "trajectories"
    {λ: (n_steps + 1, n_trajectories, 2)}, "times" (n_steps + 1,).
    """
    config.validate()
    ev, data_generator = config.eval, (generator if data_generator is None else data_generator)
    sample_data = get_dataset(config.dataset).sample
    device = torch.device(config.device)
    start = time.perf_counter()
    x = sample_data(ev.n_likelihood, generator=data_generator).to(device)
    metrics = _likelihoods(model, x, config, seed=config.train.seed)
    metrics["likelihood_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    # Every distance uses the same projections (common random numbers), so their differences
    # reflect the point sets rather than the directions drawn.
    projection_seed = int(torch.randint(0, 2 ** 62, (1,), generator=data_generator))

    def swd(a: torch.Tensor, b: torch.Tensor) -> float:
        return sliced_wasserstein(a, b, ev.swd_projections, generator=torch.Generator().manual_seed(projection_seed))

    data = sample_data(ev.n_samples, generator=data_generator).to(device)
    # The floor is itself a noisy distance between two finite sets: average it over a few pairs.
    metrics["swd_floor"] = sum(swd(sample_data(ev.n_samples, generator=data_generator),
                                   sample_data(ev.n_samples, generator=data_generator))
                               for _ in range(SWD_FLOOR_PAIRS)) / SWD_FLOOR_PAIRS
    artefacts = {"data": data.cpu(), "samples": {}, "trajectories": {}}
    for lmbd in ev.lmbds:
        settings = SamplerSettings(n_steps=ev.n_steps, lmbd=lmbd)
        samples = sample(model, (ev.n_samples, 2), settings, generator=generator, device=device)
        metrics[f"swd_lmbd{lmbd_key(lmbd)}"] = swd(samples, data)
        x_T = model.sde.prior_sample((ev.n_trajectories, 2), generator=generator, device=device, dtype=samples.dtype)
        trace = Trace(keep_states=True)
        sample(model, x_T.shape, settings, x_T=x_T, generator=generator, device=device, callback=trace)
        trajectory = torch.stack([x_T, *trace.states])
        artefacts["samples"][float(lmbd)] = samples.cpu()
        artefacts["trajectories"][float(lmbd)] = trajectory.cpu()
    artefacts["times"] = torch.linspace(model.T, 0.0, ev.n_steps + 1)
    metrics["sampling_seconds"] = time.perf_counter() - start
    return metrics, artefacts


def write_metrics(metrics: dict, path: str) -> None:
    """Write ``metrics`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())


def _check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` if needed and check it can be written, before any training is spent."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir must be a directory; {out_dir!r} is a file")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe_fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"out_dir {out_dir!r} cannot be written: {err.strerror or err}") from err


def _draw(config: ToyConfig, history: dict, metrics: dict, artefacts: dict, out_dir: str) -> None:
    sde_name = config.model_config()["sde"]["name"].upper()
    title = f"{config.dataset}: {sde_name} SDE, {config.train.steps} steps"
    plot_samples(artefacts["data"], artefacts["samples"], metrics, os.path.join(out_dir, "samples.png"), title)
    for lmbd, trajectory in artefacts["trajectories"].items():
        plot_trajectories(trajectory, artefacts["times"], artefacts["data"], lmbd,
                          os.path.join(out_dir, f"trajectories_lmbd{lmbd_key(lmbd)}.png"), title)
    second_order = config.train.second_order_steps()
    plot_training(history, metrics, os.path.join(out_dir, "training.png"), title, config.train.weighting,
                  config.train.steps - second_order + 1 if second_order else None)


def run_toy(config: ToyConfig, out_dir: str, *, resume: bool = False, hooks=()) -> dict:
    """Train (or, with ``resume``, continue training), evaluate and draw the toy example, writing
    into ``out_dir``: checkpoints, metrics.jsonl, samples.png, trajectories_lmbd<λ>.png for each λ,
    training.png and metrics.json (atomically). ``hooks`` see the training (e.g. a progress bar).
    Returns the metrics, which also record the settings and the seconds spent."""
    config.validate()
    _check_out_dir(out_dir)
    torch.manual_seed(config.train.seed)  # the network's initial weights
    start = time.perf_counter()
    ema_model, history, result = train_toy(make_toy_model(config), config, out_dir, resume=resume, hooks=hooks)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Data are drawn on the CPU; the samplers' noise where the model lives.
    data_generator = torch.Generator().manual_seed(config.train.seed)
    device = torch.device(config.device)
    generator = data_generator if device.type == "cpu" else torch.Generator(device).manual_seed(config.train.seed)
    metrics, artefacts = evaluate_toy(ema_model, config, generator, data_generator)
    metrics.update(train_seconds=train_seconds, steps=result["step"], skipped_steps=result["skipped"],
                   config=config.to_dict(), threads=torch.get_num_threads())
    _draw(config, history, metrics, artefacts, out_dir)
    metrics["eval_seconds"] = time.perf_counter() - start  # likelihoods, samples and figures
    write_metrics(metrics, os.path.join(out_dir, "metrics.json"))
    return metrics
