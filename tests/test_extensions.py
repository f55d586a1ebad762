"""Every extension point used from OUTSIDE the package, through the library's and the command line's
entry points: a training hook (sdeflow.engine.register_hook), a forward SDE (sdeflow.sdes.linear.register_sde),
a toy data set (sdeflow.data.register_dataset) and a sampler (sdeflow.samplers.register_method).
The CLI builds its --hook / --sde / --dataset / --method choices when the parser is built, so each
test registers before calling cli.main. Registrations are undone after each test.

The toy's figures are skipped (seconds each, tested in test_swissroll.py); all runs are tiny."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest
import torch

import sdeflow
from sdeflow import cli
from sdeflow.data import DATASETS, Dataset, register_dataset
from sdeflow.engine import HOOKS, Hook, register_hook
from sdeflow.experiments import toy as toy_app
from sdeflow.experiments.toy import ToyConfig, ToyEvalConfig, make_toy_model, run_toy, toy_train_config
from sdeflow.samplers import METHODS, Method, Option, SamplerSettings, Trace, register_method
from sdeflow.samplers.grids import GRIDS
from sdeflow.sdes.linear import SDES, register_sde
from sdeflow.training import OBJECTIVES, DSMObjective, register_objective

from oracle_helpers import ConstantVPSDE
from training_helpers import one_thread

RECORDS: list = []  # what the registered hook saw


class Collector(Hook):
    """A user's own hook: keeps every record in the module-level RECORDS."""

    def __init__(self):
        self.started = self.ended = False

    def on_start(self, trainer):
        RECORDS.append({"event": "collector-start"})

    def on_record(self, trainer, record):
        RECORDS.append(dict(record))

    def on_end(self, trainer):
        RECORDS.append({"event": "collector-end"})


BLOB_MEAN, BLOB_STD = torch.tensor([1.0, -0.5]), 0.3


def blob_sample(n, generator=None):
    return (BLOB_MEAN + BLOB_STD * torch.randn(n, 2, generator=generator)).float()


def blob_log_prob(x):
    x = x.double()
    z = (x - BLOB_MEAN.double()) / BLOB_STD
    return -0.5 * (z ** 2).sum(-1) - 2 * math.log(BLOB_STD) - math.log(2 * math.pi)


# ---- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def clean_registries(monkeypatch):
    """Undo every registration of the test; skip the toy's figures; one torch thread."""
    registries = (SDES, DATASETS, HOOKS, METHODS, GRIDS, OBJECTIVES)
    saved = [dict(r) for r in registries]
    monkeypatch.setattr(toy_app, "_draw", lambda *args, **kwargs: None)
    RECORDS.clear()
    with one_thread():
        yield
    RECORDS.clear()
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)


def _slices_field() -> str:
    names = {f.name for f in dataclasses.fields(ToyEvalConfig)}
    return "n_slices" if "n_slices" in names else "elbo_slices"


def tiny_config(**kwargs) -> ToyConfig:
    evaluation = ToyEvalConfig(n_samples=20, n_likelihood=10, n_steps=2, n_trajectories=2,
                               **{_slices_field(): 2})
    net = {"name": "mlp", "dim": 2, "hidden": 8, "n_blocks": 1, "fourier_features": 0, "fourier_scale": 1.0}
    return ToyConfig(train=toy_train_config(steps=3, batch_size=16, monitor_every=0, log_every=1), eval=evaluation,
                     net=net, **kwargs)


def tiny_cli_args(out) -> list:
    have = {flag for action in _subparser("swissroll")._actions for flag in action.option_strings}
    slices = "--n-slices" if "--n-slices" in have else "--elbo-slices"
    return ["--steps", "3", "--batch-size", "16", "--n-samples", "20", "--n-likelihood", "10", "--sample-steps", "2",
            "--n-trajectories", "2", slices, "2", "--hidden", "8", "--blocks", "1", "--monitor-every", "0",
            "--log-every", "1", "--no-progress", "--out", str(out)]


def _subparser(name: str):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices[name]


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as stop:
            status = stop.code
    return status, out.getvalue(), err.getvalue()


def read_metrics(out) -> dict:
    with open(out / "metrics.json") as handle:
        return json.load(handle)


def loss_steps() -> list:
    return [r["step"] for r in RECORDS if "event" not in r and r.get("loss") is not None]


# ---- (a) hooks ----------------------------------------------------------------------------------
def test_a_registered_hook_sees_the_training_through_the_cli(tmp_path):
    register_hook("test-collector", Collector)
    assert "test-collector" in HOOKS
    status, stdout, stderr = run_cli(["swissroll", *tiny_cli_args(tmp_path / "out"), "--hook", "test-collector"])
    assert status == 0, stderr
    assert RECORDS[0] == {"event": "collector-start"} and RECORDS[-1] == {"event": "collector-end"}
    assert loss_steps() == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in RECORDS if r.get("step") in (1, 2, 3) and "event" not in r)
    assert "trained 3 steps" in stdout


def test_an_unregistered_hook_name_is_refused_in_one_line(tmp_path):
    status, _, stderr = run_cli(["swissroll", *tiny_cli_args(tmp_path / "out"), "--hook", "test-collector"])
    assert status == 2 and stderr.count("\n") == 1 and "test-collector" in stderr
    assert not RECORDS


def test_a_hook_instance_sees_the_training_through_run_toy(tmp_path):
    metrics = run_toy(tiny_config(), str(tmp_path / "out"), hooks=[Collector()])
    assert metrics["steps"] == 3
    assert loss_steps() == [1, 2, 3]
    assert RECORDS[-1] == {"event": "collector-end"}


def test_register_hook_refuses_a_taken_name_and_a_non_callable():
    with pytest.raises(ValueError):
        register_hook("jsonl", Collector)
    with pytest.raises(ValueError):
        register_hook("test-collector", 3)
    assert "test-collector" not in HOOKS


# ---- (b) SDEs -----------------------------------------------------------------------------------
def test_a_registered_sde_trains_the_toy_through_run_toy(tmp_path):
    register_sde("test-constant-vp", ConstantVPSDE)
    config = tiny_config(sde={"name": "test-constant-vp", "beta": 6.0})
    model = make_toy_model(config)
    assert isinstance(model.sde, ConstantVPSDE) and model.sde.beta == 6.0
    metrics = run_toy(config, str(tmp_path / "out"))
    assert metrics["steps"] == 3
    assert metrics["config"]["sde"] == {"name": "test-constant-vp", "beta": 6.0}
    assert math.isfinite(metrics["elbo_nats"]) and math.isfinite(metrics["ode_logp_nats"])
    checkpoint = torch.load(next((tmp_path / "out").glob("ckpt-*.pt")), weights_only=True)
    assert "test-constant-vp" in repr(checkpoint)  # the checkpoint names the SDE


def test_a_registered_sde_and_its_parameter_flag_through_the_cli(tmp_path):
    register_sde("test-constant-vp", ConstantVPSDE)
    out = tmp_path / "out"
    status, _, stderr = run_cli(["swissroll", *tiny_cli_args(out), "--sde", "test-constant-vp", "--beta", "5"])
    assert status == 0, stderr
    sde = read_metrics(out)["config"]["sde"]
    assert sde["name"] == "test-constant-vp" and sde["beta"] == 5.0
    # a parameter of another SDE is refused, in one line
    status, _, stderr = run_cli(["swissroll", *tiny_cli_args(tmp_path / "o2"), "--sde", "test-constant-vp",
                                 "--beta-max", "5"])
    assert status == 2 and stderr.count("\n") == 1 and "--beta-max" in stderr


# ---- (c) data sets ------------------------------------------------------------------------------
def test_a_registered_toy_dataset_trains_through_run_toy_and_the_cli(tmp_path):
    register_dataset(Dataset("test-blob", "toy", (2,), "one Gaussian blob", sample=blob_sample,
                             log_prob=blob_log_prob))
    metrics = run_toy(tiny_config(dataset="test-blob"), str(tmp_path / "lib"))
    assert metrics["config"]["dataset"] == "test-blob"
    # the exact density is known, so the run reports the true log-density of its test points
    assert "true_logp_nats" in metrics
    assert -3.0 < metrics["true_logp_nats"] < 0.5  # entropy of N(μ, 0.3² I) is ≈ 0.43 nats → E log p ≈ −0.43

    status, _, stderr = run_cli(["swissroll", *tiny_cli_args(tmp_path / "cli"), "--dataset", "test-blob"])
    assert status == 0, stderr
    cli_metrics = read_metrics(tmp_path / "cli")
    assert cli_metrics["config"]["dataset"] == "test-blob" and "true_logp_nats" in cli_metrics


def test_an_image_dataset_is_not_a_toy_choice(tmp_path):
    status, _, stderr = run_cli(["swissroll", *tiny_cli_args(tmp_path / "out"), "--dataset", "cifar10"])
    assert status == 2 and stderr.count("\n") == 1
    with pytest.raises(ValueError, match="toy"):
        tiny_config(dataset="cifar10").validate()


# ---- (d) samplers -------------------------------------------------------------------------------
CALLS: list = []


def _scaled_euler_step(model, x, t, t_next, lmbd, generator, last, state):
    """Euler on the probability-flow ODE, counting its calls and recording its option."""
    CALLS.append((float(t[0]), float(t_next[0]), state["scale"]))
    h = (t - t_next).reshape(-1, *([1] * (x.ndim - 1)))
    return x + state["scale"] * model.generative_drift(x, t, lmbd) * h, 1


def _check_scale(name, value):
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be positive; got {value}")
    return value


def test_a_registered_sampler_draws_through_sdeflow_sample():
    CALLS.clear()
    register_method("test-euler-ode", Method(_scaled_euler_step, order="1", nfe_per_step=1, lmbd="λ = 1 only",
                                             lmbd_range=(1.0, 1.0), default_lmbd=1.0,
                                             options={"scale": Option(1.0, _check_scale, "drift scale")}))
    torch.manual_seed(0)
    model = make_toy_model(tiny_config())
    trace = Trace()
    x = sdeflow.sample(model, (5, 2), SamplerSettings(method="test-euler-ode", n_steps=4),
                       generator=torch.Generator().manual_seed(1), callback=trace)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    assert trace.nfe == 4 and len(CALLS) == 4
    assert SamplerSettings(method="test-euler-ode").validate(model.T).lmbd == 1.0
    assert CALLS[0][0] == pytest.approx(model.T) and CALLS[-1][1] == pytest.approx(0.0)
    assert {c[2] for c in CALLS} == {1.0}
    # the built-in Euler at λ = 1 takes the same steps
    same = sdeflow.sample(model, (5, 2), SamplerSettings(method="euler", n_steps=4, lmbd=1.0),
                          generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x, same)
    # its option is passed, checked, and refused by other methods
    CALLS.clear()
    sdeflow.sample(model, (2, 2), SamplerSettings(method="test-euler-ode", n_steps=2, options={"scale": 0.5}))
    assert {c[2] for c in CALLS} == {0.5}
    with pytest.raises(ValueError, match="scale"):
        sdeflow.sample(model, (2, 2), SamplerSettings(method="test-euler-ode", n_steps=2, options={"scale": -1.0}))
    with pytest.raises(ValueError, match="scale"):
        sdeflow.sample(model, (2, 2), SamplerSettings(method="euler", n_steps=2, options={"scale": 0.5}))
    with pytest.raises(ValueError):
        sdeflow.sample(model, (2, 2), SamplerSettings(method="test-euler-ode", n_steps=2, lmbd=0.0))


def test_a_registered_sampler_is_a_choice_of_the_sampling_commands():
    register_method("test-euler-ode", Method(_scaled_euler_step, order="1", nfe_per_step=1, lmbd="λ = 1 only",
                                             lmbd_range=(1.0, 1.0), default_lmbd=1.0,
                                             options={"scale": Option(1.0, _check_scale, "drift scale")}))
    for command in ("sample", "inpaint", "denoise"):
        parser = _subparser(command)
        method = next(a for a in parser._actions if "--method" in a.option_strings)
        assert "test-euler-ode" in method.choices
        assert any("--scale" in a.option_strings or "--method-scale" in a.option_strings for a in parser._actions)
    # a bad value of its option is refused by the parser in one line
    status, _, stderr = run_cli(["sample", "--checkpoint", "nowhere", "--out", "x.png", "--method",
                                 "test-euler-ode", "--scale", "-2"])
    assert status == 2 and stderr.count("\n") == 1 and "scale" in stderr


def test_registrations_do_not_leak_between_tests():
    for registry, name in ((HOOKS, "test-collector"), (SDES, "test-constant-vp"), (DATASETS, "test-blob"),
                           (METHODS, "test-euler-ode"), (OBJECTIVES, "test-velocity")):
        assert name not in registry


# ---- training objectives ----------------------------------------------------------------------------
def test_a_registered_objective_is_a_choice_of_sdeflow_train_with_its_settings():
    """register_objective: its settings fill what the user leaves unset, an explicit flag wins, and the
    loss module it builds is what training minimises."""
    from sdeflow.commands.train import resolve_recipe
    from sdeflow.training import build_objective

    built = []

    def build(model, config, data_config):
        built.append(config.weighting)
        return DSMObjective(model, config, data_config)

    register_objective("test-velocity", {"transform": "centered", "parameterization": "velocity",
                                         "weighting": "noise", "time_sampling": "uniform"}, build)

    def resolved(*extra):
        args = cli.build_parser().parse_args(["train", "--dataset", "mnist", "--data-root", "d", "--out", "o",
                                              "--objective", "test-velocity", *extra])
        resolve_recipe(args)
        return args
    args = resolved()
    assert (args.transform, args.parameterization, args.weighting) == ("centered", "velocity", "noise")
    assert resolved("--weighting", "likelihood").weighting == "likelihood"
    model = sdeflow.PluginReverseSDE(sdeflow.VPSDE(), torch.nn.Linear(2, 2), "velocity")
    loss = build_objective("test-velocity", model, sdeflow.TrainConfig(steps=1, batch_size=1, weighting="noise"))
    assert isinstance(loss, DSMObjective) and built == ["noise"]


def test_register_objective_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="an objective named 'samples' is already registered"):
        register_objective("samples", {})
    with pytest.raises(ValueError, match="settings may fix"):
        register_objective("test-bad", {"lr": 1.0})
    with pytest.raises(ValueError, match="build must be callable"):
        register_objective("test-bad", {}, build="dsm")
    from sdeflow.training import build_objective
    with pytest.raises(ValueError, match="objective must be one of"):
        build_objective("nope", None, sdeflow.TrainConfig(steps=1, batch_size=1))
