"""End-to-end tests of the toy example: sdeflow.toy, the `sdeflow swissroll` command and
examples/swissroll.py."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from sdeflow.training import objectives

from sdeflow.cli import main
from sdeflow.data import sample_toy
from sdeflow.commands.swissroll import summary
from sdeflow.experiments.toy import (OUTPUT_FILES, ToyConfig, ToyEvalConfig, evaluate_toy, make_toy_model,
                                     toy_train_config, train_toy, write_metrics)


def _net(hidden):
    return {**ToyConfig().net, "hidden": hidden}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "40", "--batch-size", "64", "--sample-steps", "20", "--n-samples", "300",
        "--n-likelihood", "100", "--hidden", "16", "--no-progress"]


def test_end_to_end_writes_every_file_with_finite_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["swissroll", "--out", str(out), "--lmbd", "0.5", *FAST])
    assert status == 0
    for name in OUTPUT_FILES + ("trajectories_lmbd0.5.png",):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("elbo_nats", "elbo_se", "ode_logp_nats", "swd_lmbd0", "swd_lmbd1", "swd_lmbd0.5",
                "swd_floor", "train_seconds", "eval_seconds"):
        assert math.isfinite(metrics[key]), key
    assert metrics["elbo_se"] > 0 and metrics["swd_floor"] > 0 and metrics["train_seconds"] > 0
    assert metrics["config"]["lmbds"] == [0.0, 0.5, 1.0] and metrics["config"]["steps"] == 40
    assert "true_logp_nats" not in metrics  # the swiss roll has no closed-form density
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left behind
    printed = capsys.readouterr().out
    assert "test ELBO" in printed and "sliced W1" in printed and "λ=0.5" in printed


def test_training_is_reproducible_from_its_seed(tmp_path):
    config = ToyConfig(net=_net(8), train=toy_train_config(steps=30, batch_size=32, monitor_every=10, monitor_batch=16,
                                                           log_every=1, seed=5))
    runs = []
    for i in range(2):
        torch.manual_seed(5)
        model, history, _ = train_toy(make_toy_model(config), config, tmp_path / f"run{i}")
        runs.append((torch.cat([p.flatten() for p in model.parameters()]), history))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert len(runs[0][1]["loss"]) == 30 and runs[0][1]["elbo_step"] == [10, 20, 30]
    assert all(math.isfinite(v) for v in runs[0][1]["running_elbo"])


def test_the_last_fraction_of_steps_trains_with_second_order_dsm(monkeypatch, tmp_path):
    config = ToyConfig(net=_net(8), train=toy_train_config(steps=16, second_order_fraction=0.25, batch_size=16,
                                                           monitor_every=100, monitor_batch=8))
    model = make_toy_model(config)
    orders = []
    dsm = objectives.dsm

    def spy(*args, order=1, **kwargs):
        orders.append(order)
        return dsm(*args, order=order, **kwargs)

    monkeypatch.setattr(objectives, "dsm", spy)
    train_toy(model, config, tmp_path / "run")
    assert orders == [1] * 12 + [2] * 4
    with pytest.raises(ValueError, match="second_order_fraction"):
        ToyConfig(train=toy_train_config(second_order_fraction=-0.1)).validate()
    with pytest.raises(ValueError, match="second_order_weight"):
        ToyConfig(train=toy_train_config(second_order_weight=float("nan"))).validate()


def test_evaluation_of_the_zero_network_matches_closed_forms():
    # The MLP's output layer starts at zero, so a = 0: the ODE is dy/dt = f(t)·y, giving
    # log p_ODE(x) = log p_T(m(T)·x) − D·B(T)/2 exactly, and the ELBO integrand is the constant
    # D·f(t), giving ELBO(x) = −D·B(T)/2 + E[log p_T(y_T)]. The gap between them is −D·v(T)/2.
    config = ToyConfig(dataset="gaussian_mixture", net=_net(8),
                       eval=ToyEvalConfig(n_likelihood=200, n_samples=200, n_steps=20, n_trajectories=10))
    torch.manual_seed(0)
    model = make_toy_model(config)
    metrics, artefacts = evaluate_toy(model, config, torch.Generator().manual_seed(0))
    for key in ("true_logp_nats", "elbo_gap_nats", "ode_gap_nats", "elbo_gap_se", "ode_gap_se"):
        assert math.isfinite(metrics[key]), key
    assert metrics["elbo_gap_nats"] == pytest.approx(metrics["true_logp_nats"] - metrics["elbo_nats"], abs=1e-9)
    x = sample_toy("gaussian_mixture", 200, generator=torch.Generator().manual_seed(0))  # evaluate_toy's first draw
    sde, one = model.sde, torch.tensor(1.0)
    half_dim_B = float(sde.beta_integral(one))  # D/2·B(T) with D = 2
    ode = sde.prior_log_prob(float(sde.mean_weight(one)) * x.double()) - half_dim_B
    elbo = sde.expected_prior_log_prob(x.double()) - half_dim_B
    assert metrics["ode_logp_nats"] == pytest.approx(float(ode.mean()), abs=1e-3)
    assert abs(metrics["elbo_nats"] - float(elbo.mean())) < 4 * metrics["elbo_se"] + 1e-3
    assert metrics["elbo_minus_ode_nats"] == pytest.approx(-float(sde.var(one)), abs=4 * metrics["elbo_minus_ode_se"] + 1e-3)
    assert artefacts["trajectories"][0.0].shape == (21, 10, 2)
    assert artefacts["samples"][1.0].shape == (200, 2)


def test_lr_schedule_warms_up_then_decays():
    config = toy_train_config(steps=1000, warmup_steps=100, final_lr_fraction=0.1)
    factors = [config.lr_at(step) / config.lr for step in range(1000)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[100:], factors[101:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-4)


def test_metrics_are_written_atomically(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics({"a": 1.0}, str(path))
    write_metrics({"a": 2.0}, str(path))
    assert json.loads(path.read_text()) == {"a": 2.0}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_summary_names_every_number():
    metrics = {"config": {"dataset": "checkerboard", "steps": 10}, "train_seconds": 1.0, "eval_seconds": 2.0,
               "elbo_nats": -2.2, "elbo_se": 0.01, "ode_logp_nats": -2.15, "ode_logp_se": 0.01, "ode_nfe": 100.0,
               "true_logp_nats": -2.079, "elbo_gap_nats": 0.12, "elbo_gap_se": 0.01, "ode_gap_nats": 0.07,
               "ode_gap_se": 0.01, "swd_lmbd0": 0.03, "swd_lmbd1": 0.04, "swd_floor": 0.02}
    text = summary(metrics, "runs/x")
    assert "-2.200" in text and "λ=0: 0.0300" in text and "λ=1: 0.0400" in text and "floor 0.0200" in text


def _status(argv) -> int:
    """cli.main's exit status, whether argparse exits (SystemExit) or the handler returns."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "spiral"], "invalid choice: 'spiral'"),
    (["--steps", "0"], "--steps: steps must be a positive integer; got 0"),
    (["--steps", "-5"], "--steps: steps must be a positive integer; got -5"),
    (["--batch-size", "0"], "--batch-size: batch_size must be a positive integer; got 0"),
    (["--lmbd", "1.5"], "--lmbd: lmbd must lie in [0, 1]"),
    (["--lr", "nan"], "--lr: lr must be a positive finite number; got nan"),
    (["--ema-decay", "1"], "ema_decay must lie in [0, 1)"),
    (["--device", "tpu9"], "device must be a torch device"),
    (["--second-order-fraction", "1.5"], "--second-order-fraction: second_order_fraction must lie in [0, 1]; got 1.5"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert _status(["swissroll", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # rejected before anything is written


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["swissroll", "--out", str(blocker / "sub"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and len(err.strip().splitlines()) == 1
    assert main(["swissroll", "--out", str(blocker), *FAST]) == 2
    assert "is a file" in capsys.readouterr().err


def test_example_script_runs_as_a_program(tmp_path):
    script = os.path.join(REPO, "examples", "swissroll.py")
    result = subprocess.run([sys.executable, script, "--steps", "0", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--steps" in result.stderr and "Traceback" not in result.stderr
