"""The training loop, EMA, learning-rate schedule, resume bookkeeping, bits/dim evaluation, sampling."""

import json
import math

import pytest
import torch
from sdeflow.training import objectives

import sdeflow
from sdeflow import LikelihoodSettings
from torch import nn

from sdeflow.storage import checkpoints as ckpt
from sdeflow.training import TrainConfig
from sdeflow.engine import EMA
from sdeflow.engine.state import make_generator, step_seed
from sdeflow.likelihood.evaluation import evaluate_bpd, quantization_time
from sdeflow.experiments import images as images_app
from sdeflow.plotting import save_image_grid
from sdeflow.samplers import SamplerSettings
from sdeflow.data import transforms

from training_helpers import single_thread, tiny_config, tiny_images, tiny_model, tiny_train_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ema_averages_parameters_and_copies_buffers():
    model = nn.BatchNorm1d(3)  # has parameters and buffers
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.equal(ema.model.running_mean, torch.full((3,), 5.0))  # copied, not averaged
    assert set(ema.state_dict()) == {"weight", "bias"}  # parameters only
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_learning_rate_warmup_and_cosine():
    config = TrainConfig(steps=10, batch_size=1, lr=1.0, warmup_steps=4, lr_schedule="cosine")
    assert [config.lr_at(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert config.lr_at(3) == pytest.approx(1.0)
    assert config.lr_at(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert TrainConfig(steps=5, batch_size=1, lr=0.3, warmup_steps=0, lr_schedule="constant").lr_at(4) == 0.3


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps"), ("batch_size", -1, "batch_size"), ("lr", 0.0, "lr"), ("lr", float("nan"), "lr"),
    ("ema_decay", 1.0, "ema_decay"), ("time_sampling", "fitted", "time_sampling"),
    ("weighting", "snr", "weighting"), ("precision", "fp16", "precision"), ("grad_clip", -1.0, "grad_clip"),
    ("keep_checkpoints", 0, "keep_checkpoints"), ("lr_schedule", "step", "lr_schedule"),
])
def test_train_config_validation(field, value, match):
    config = TrainConfig(steps=2, batch_size=2)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        config.validate()


def test_train_logs_checkpoints_keeps_last_k_and_resumes(tmp_path):
    config, images = tiny_config(), tiny_images()
    run = tmp_path / "run"
    result = images_app.train_images(tiny_model(config), images, run, tiny_train_config(steps=4, keep_checkpoints=1),
                            config)
    assert result["step"] == 4 and result["skipped"] == 0
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["ckpt-00000004.pt"]
    records = [r for r in _log(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)

    state = ckpt.load_checkpoint(run / "ckpt-00000004.pt", expected_config=config)
    assert state["step"] == 4 and state["trainer"]["data_order"] == {"epoch": 0, "offset": 16}
    assert set(state["ema"]) == {n for n, _ in tiny_model(config).named_parameters()}
    assert state["optimizer"]["state"]  # Adam moments are saved

    with pytest.raises(ValueError, match="already holds checkpoints"):
        images_app.train_images(tiny_model(config), images, run, tiny_train_config(steps=6), config)
    result = images_app.train_images(tiny_model(config), images, run, tiny_train_config(steps=6, keep_checkpoints=1),
                            config, resume=True)
    assert result["step"] == 6
    assert [r["step"] for r in _log(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in _log(run))


def test_resume_refuses_missing_checkpoint_and_other_configuration(tmp_path):
    config, images = tiny_config(), tiny_images()
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        images_app.train_images(tiny_model(config), images, tmp_path / "empty", tiny_train_config(), config, resume=True)
    images_app.train_images(tiny_model(config), images, tmp_path / "run", tiny_train_config(steps=2), config)
    other = tiny_config(parameterization="drift")
    with pytest.raises(ckpt.CheckpointError, match="parameterization: checkpoint has 'noise', asked for 'drift'"):
        images_app.train_images(tiny_model(other), images, tmp_path / "run", tiny_train_config(steps=3), other, resume=True)


def test_loss_options_reach_the_model(tmp_path, monkeypatch):
    config, images = tiny_config(), tiny_images()
    model = tiny_model(config)
    seen = []
    original = objectives.dsm

    def spy(model, x, time_sampling, weighting, generator, t_min, stratified_time):
        seen.append((time_sampling, weighting, t_min, stratified_time, x.dtype, tuple(x.shape)))
        return original(model, x, time_sampling=time_sampling, weighting=weighting, generator=generator, t_min=t_min,
                        stratified_time=stratified_time)

    monkeypatch.setattr(objectives, "dsm", spy)
    images_app.train_images(model, images, tmp_path / "run", tiny_train_config(
        steps=1, time_sampling="uniform", weighting="noise", loss_t_min=1e-4, stratified_time=True), config)
    assert seen == [("uniform", "noise", 1e-4, True, torch.float32, (4, 1, 8, 8))]


def test_bf16_autocast_trains(tmp_path):
    config = tiny_config()
    result = images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "run",
                            tiny_train_config(steps=2, precision="bf16"), config)
    assert result["skipped"] == 0
    assert all(math.isfinite(r["loss"]) for r in _log(tmp_path / "run") if "loss" in r)


@pytest.mark.parametrize("images,match", [
    (torch.rand(8, 1, 8, 8), "uint8"),
    (torch.zeros(8, 3, 8, 8, dtype=torch.uint8), r"shape \(N, 1, 8, 8\)"),
    (torch.zeros(8, 8, 8, dtype=torch.uint8), "shape"),
])
def test_bad_images_refused(tmp_path, images, match):
    config = tiny_config()
    with pytest.raises(ValueError, match=match):
        images_app.train_images(tiny_model(config), images, tmp_path / "run", tiny_train_config(), config)
    with pytest.raises(ValueError, match=match):
        evaluate_bpd(tiny_model(config), images, config)


def test_batch_larger_than_data_refused(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match="larger than the data set"):
        images_app.train_images(tiny_model(config), tiny_images(3), tmp_path / "run", tiny_train_config(), config)


def test_evaluate_bpd_is_the_mean_of_per_image_bits_per_dim():
    config = tiny_config()
    model = tiny_model(config).eval()
    images = tiny_images(10)
    result = evaluate_bpd(model, images, config, batch_size=4, seed=5, settings=LikelihoodSettings(time_sampling="importance"))
    assert result["estimator"].endswith("4 slices per example, uniform dequantization")
    per_image = result["bpd_per_image"]
    assert result["n_images"] == 10 and per_image.shape == (10,)
    assert result["bpd"] == pytest.approx(float(per_image.mean()), rel=1e-12)
    assert result["bpd_se"] == pytest.approx(float(per_image.std() / math.sqrt(10)), rel=1e-12)
    # The first batch again, by hand, with the same generator: the same numbers.
    gen = make_generator(torch.device("cpu"), step_seed(5, 0, 0, stream=3))
    batch = images_app.preprocess(images[:4], config["data"], gen)
    t_min = quantization_time(model.sde, config["data"])
    elbo = sdeflow.elbo(model, batch.y, n_slices=4, time_sampling="importance", generator=gen, t_min=t_min)
    by_hand = transforms.bits_per_dim(elbo.detach().double(), batch.logdet.double(), 64)
    assert torch.allclose(per_image[:4], by_hand, rtol=1e-10)
    # truncated-normal dequantization, ODE from t_σ: the same numbers by hand too
    tn = evaluate_bpd(model, images[:2], config, batch_size=2, seed=5, settings=LikelihoodSettings(bound="ode", rtol=1e-3, atol=1e-3, dequantization="truncated-normal"))
    gen = make_generator(torch.device("cpu"), step_seed(5, 0, 0, stream=3))
    y, weight = transforms.truncated_normal_dequantize(images[:2], config["data"]["transform"], config["data"]["alpha"],
                                                       generator=gen)
    logp = sdeflow.log_prob_ode(model, y, rtol=1e-3, atol=1e-3, t_min=t_min, generator=gen)[0]
    by_hand = transforms.bits_per_dim(logp.detach().double(), weight.double(), 64)
    assert torch.allclose(tn["bpd_per_image"], by_hand, rtol=1e-10)
    assert tn["estimator"].startswith(f"probability-flow ODE from t_min {t_min:g}")
    assert tn["estimator"].endswith("truncated-normal dequantization")
    with pytest.raises(ValueError, match="dequantization"):
        evaluate_bpd(model, images, config, settings=LikelihoodSettings(dequantization="gaussian"))


def test_evaluate_bpd_reproducible_fitted_default_and_ode_nfe():
    config = tiny_config()
    model = tiny_model(config)
    images = tiny_images(6)
    first = evaluate_bpd(model, images, config, batch_size=3, seed=2)
    again = evaluate_bpd(model, images, config, batch_size=3, seed=2)
    other = evaluate_bpd(model, images, config, batch_size=3, seed=3)
    assert first["bpd"] == again["bpd"] and first["bpd_se"] == again["bpd_se"]
    assert first["bpd"] != other["bpd"]
    assert "time proposal fitted on" in first["estimator"]  # the default fits a proposal on a pilot batch
    assert not hasattr(model, "time_proposal")  # ... and hands it to the estimate: the model is not changed
    ode = evaluate_bpd(model, images[:2], config, batch_size=2, settings=LikelihoodSettings(bound="ode", rtol=1e-3, atol=1e-3))
    assert ode["nfe"] > 0 and math.isfinite(ode["bpd"])


def test_sample_images_deterministic_and_grid_written(tmp_path):
    config = tiny_config()
    model = tiny_model(config)
    a = images_app.sample_images(model, config, 5, SamplerSettings(n_steps=4), seed=1)
    b = images_app.sample_images(model, config, 5, SamplerSettings(n_steps=4), seed=1)
    assert a.dtype == torch.uint8 and a.shape == (5, 1, 8, 8) and torch.equal(a, b)
    path = save_image_grid(a, tmp_path / "grid.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_order_dsm_on_images_is_refused_before_training(tmp_path):
    config = tiny_config(image_size=9)  # 81 dimensions
    with pytest.raises(ValueError, match="second_order_fraction must be 0 for these images"):
        images_app.train_images(tiny_model(config), tiny_images(size=9), tmp_path / "run",
                                tiny_train_config(second_order_fraction=0.5), config)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_loss_start_beyond_T_is_refused_before_training(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match=r"loss_t_min must lie in \[0, T=1.0\); got 1.5"):
        images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "run",
                                tiny_train_config(loss_t_min=1.5), config)
    assert not (tmp_path / "run").exists()  # nothing written


def test_fit_minimises_the_objective_it_is_given(tmp_path, single_thread):
    """The training objective is a value: train_images / fit minimise the module passed in (here the
    registered "samples" objective, counted), and refuse what is not a module."""
    from sdeflow.training import build_objective

    config, train = tiny_config(), tiny_train_config(steps=3)
    model = tiny_model(config)
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, y, generator, order=1):
            calls.append(order)
            return self.inner(y, generator, order)

    objective = Counting(build_objective("samples", model, train, config["data"]))
    images_app.train_images(model, tiny_images(), tmp_path / "run", train, config, objective=objective)
    assert calls == [1, 1, 1]
    with pytest.raises(ValueError, match="objective must be a torch.nn.Module"):
        images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "other", train, config, objective="dsm")


def test_every_train_config_field_is_in_exactly_one_group():
    """TrainConfig's groups (loss, optimizer, run, monitoring) cover its fields once each; the loss group is
    what an objective may fix."""
    import dataclasses

    from sdeflow.training.config import TRAIN_GROUPS
    from sdeflow.training.objectives import LOSS_SETTINGS

    grouped = [name for fields in TRAIN_GROUPS.values() for name in fields]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    config = TrainConfig(steps=3, batch_size=2, weighting="noise")
    assert config.group("loss")["weighting"] == "noise" and set(config.group("loss")) == set(LOSS_SETTINGS)
    with pytest.raises(ValueError, match="group must be one of"):
        config.group("everything")


@pytest.mark.parametrize("p_uncond", [0.0, 1.0])
def test_class_conditional_training_drops_labels_to_the_null_class(tmp_path, single_thread, p_uncond):
    """With labels, a class-conditional network learns the embeddings of the classes it sees; with
    p_uncond = 1 every label is dropped and only the null class's embedding moves."""
    from training_helpers import TINY_NET
    from sdeflow.experiments.images import image_model_config

    config = image_model_config("toy", "small", net_overrides={**TINY_NET, "num_classes": 3}, in_channels=1,
                                image_size=8)
    model = tiny_model(config)
    before = model.net.class_embed.table.weight.detach().clone()
    labels = torch.tensor([0, 1] * 12)  # class 2 is never seen
    images_app.train_images(model, tiny_images(), tmp_path / "run", tiny_train_config(steps=3, p_uncond=p_uncond),
                            config, labels=labels)
    moved = (model.net.class_embed.table.weight.detach() - before).abs().sum(1) > 0
    assert moved.tolist() == ([True, True, False, False] if p_uncond == 0.0 else [False, False, False, True])
    with pytest.raises(ValueError, match="labels must have one entry per example"):
        images_app.train_images(tiny_model(config), tiny_images(), tmp_path / "bad", tiny_train_config(steps=1),
                                config, labels=labels[:5])
