"""The one training loop (sdeflow.engine): seeded global generators, hooks, exact resume of the toy."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from sdeflow.training import objectives

from sdeflow.cli import main
from sdeflow.engine import Hook, StreamBatches, fit
from sdeflow.experiments import images as images_app
from sdeflow.experiments.toy import ToyConfig, make_toy_model, toy_train_config

from training_helpers import single_thread, tiny_config, tiny_images, tiny_model, tiny_train_config  # noqa: F401


class DrawFromGlobalGenerators(Hook):
    """User code that draws from numpy's and Python's global generators at every step."""

    def __init__(self):
        self.draws = {}

    def on_step(self, trainer):
        self.draws[trainer.step] = (float(np.random.rand()), random.random(), float(torch.rand(())))


def test_global_generators_are_seeded_from_the_run_and_resume_exactly(tmp_path, single_thread):
    config = tiny_config()
    straight = DrawFromGlobalGenerators()
    images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "a", tiny_train_config(steps=4), config,
                            hooks=[straight])
    first, second = DrawFromGlobalGenerators(), DrawFromGlobalGenerators()
    images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "b", tiny_train_config(steps=2), config,
                            hooks=[first])
    images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "b", tiny_train_config(steps=4), config,
                            resume=True, hooks=[second])
    assert {**first.draws, **second.draws} == straight.draws
    # Another seed draws other numbers: the generators follow the run's seed, not the process's history.
    other = DrawFromGlobalGenerators()
    images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "c", tiny_train_config(steps=1, seed=2),
                            config, hooks=[other])
    assert other.draws[1] != straight.draws[1]
    saved_a = torch.load(tmp_path / "a" / "ckpt-00000004.pt", weights_only=True)["trainer"]["rng"][0]
    saved_b = torch.load(tmp_path / "b" / "ckpt-00000004.pt", weights_only=True)["trainer"]["rng"][0]
    assert torch.equal(saved_a["numpy"]["keys"], saved_b["numpy"]["keys"]) and saved_a["python"] == saved_b["python"]


class Stopper(Hook):
    name = "stopper"

    def on_step(self, trainer):
        if trainer.step == 3:
            trainer.stop("enough")


def test_a_hook_can_stop_training_with_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = ToyConfig(train=toy_train_config(steps=10, batch_size=16, monitor_every=0, checkpoint_every=100))
    model = make_toy_model(config)
    batches = StreamBatches(lambda n, generator: torch.randn(n, 2, generator=generator), 16, seed=0)
    result = fit(model, batches, config.train, tmp_path, config.model_config(), hooks=[Stopper()])
    assert result["step"] == 3 and result["checkpoint"].name == "ckpt-00000003.pt"


TINY_TOY = ["--batch-size", "16", "--hidden", "8", "--n-samples", "50", "--n-likelihood", "20", "--sample-steps", "5",
            "--n-trajectories", "4", "--n-slices", "2", "--monitor-every", "2", "--monitor-batch", "8",
            "--checkpoint-every", "2", "--log-every", "1", "--no-progress"]


def test_swissroll_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    assert main(["swissroll", "--out", str(tmp_path / "a"), "--steps", "4", *TINY_TOY]) == 0
    assert main(["swissroll", "--out", str(tmp_path / "b"), "--steps", "2", *TINY_TOY]) == 0
    assert main(["swissroll", "--out", str(tmp_path / "b"), "--steps", "4", "--resume", *TINY_TOY]) == 0
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b")]
    losses = [[(r["step"], r["loss"]) for r in log if "loss" in r and "event" not in r] for log in logs]
    elbos = [[(r["step"], r["running_elbo"]) for r in log if r.get("event") == "elbo"] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert elbos[0] == elbos[1] and [step for step, _ in elbos[0]] == [2, 4]
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("a", "b")]
    for key in ("elbo_nats", "ode_logp_nats", "swd_lmbd0", "swd_lmbd1"):
        assert metrics[0][key] == metrics[1][key], key
    # Without --resume an existing run is refused, nothing overwritten.
    capsys.readouterr()
    assert main(["swissroll", "--out", str(tmp_path / "a"), "--steps", "4", *TINY_TOY]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("sde, extra", [("ve", ["--sigma-max", "5"]), ("subvp", ["--beta-max", "10"])])
def test_swissroll_trains_with_any_sde_and_its_parameters(tmp_path, capsys, sde, extra):
    out = tmp_path / "run"
    status = main(["swissroll", "--out", str(out), "--steps", "2", "--sde", sde, *extra, *TINY_TOY])
    if sde == "ve":
        # A barely trained VE model's probability flow is stiff near T (g(T) ≈ 18): the adaptive ODE
        # solve may give up, which must be one line and exit 1, never a traceback.
        err = capsys.readouterr().err
        assert status == 0 or (status == 1 and "ODE solver failed" in err and len(err.strip().splitlines()) == 1)
    else:
        assert status == 0
        assert json.loads((out / "metrics.json").read_text())["config"]["sde"]["name"] == sde
    stored = torch.load(out / "ckpt-00000002.pt", weights_only=True)["config"]["sde"]
    assert stored["name"] == sde and stored[extra[0][2:].replace("-", "_")] == float(extra[1])


def test_sde_parameter_of_another_sde_is_refused(tmp_path, capsys):
    assert main(["swissroll", "--out", str(tmp_path / "o"), "--sde", "vp", "--sigma-max", "5", *TINY_TOY]) == 2
    err = capsys.readouterr().err
    assert "--sigma-max does not apply to --sde vp" in err and len(err.strip().splitlines()) == 1


class FakeClock:
    """time.perf_counter that advances one second per training step (read by the time budget)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Tick(Hook):
    def __init__(self, clock):
        self.clock = clock

    def on_step(self, trainer):
        self.clock.now += 1.0


def test_time_budget_fits_the_schedule_to_the_steps_it_affords(tmp_path, monkeypatch):
    from sdeflow.engine import hooks as hooks_module

    clock = FakeClock()
    monkeypatch.setattr(hooks_module.time, "perf_counter", clock)
    torch.manual_seed(0)
    train = toy_train_config(steps=1000, batch_size=8, monitor_every=0, checkpoint_every=10_000, log_every=1,
                             warmup_steps=2, max_seconds=40.0, fit_schedule=True, second_order_fraction=0.25)
    config = ToyConfig(net={**ToyConfig().net, "hidden": 8}, train=train)
    batches = StreamBatches(lambda n, generator: torch.randn(n, 2, generator=generator), 8, seed=0)
    records = []

    class Remember(Hook):
        def on_record(self, trainer, record):
            records.append(record)

    orders = []
    model = make_toy_model(config)
    dsm = objectives.dsm
    monkeypatch.setattr(objectives, "dsm", lambda *a, order=1, **k: orders.append(order) or dsm(*a, order=order, **k))
    result = fit(model, batches, train, tmp_path, config.model_config(), hooks=[Tick(clock), Remember()])
    # One second per step and 40 seconds: the plan ends at step 40, not at the requested 1000 ...
    assert result["step"] == 40 and result["checkpoint"].name == "ckpt-00000040.pt"
    assert any(r.get("event") == "schedule fitted" and r["steps"] == 40 for r in records)
    # ... and the schedule ends there: cosine decayed to its floor, the last quarter second-order.
    lrs = [r["lr"] for r in records if "lr" in r and "event" not in r]
    fitted = dataclasses.replace(train, steps=40)
    assert lrs[-1] == fitted.lr_at(39) and lrs[-1] < 1.1 * train.lr * train.final_lr_fraction
    assert orders[-10:] == [2] * 10 and orders.count(2) == 10
    saved = torch.load(tmp_path / "ckpt-00000040.pt", weights_only=True)["trainer"]
    assert saved["hooks"]["time_budget"]["planned"] == 40 and saved["train_config"]["steps"] == 40
