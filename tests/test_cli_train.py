"""``sdeflow train``: what the flags resolve to (objective, CPU budget, flips) and the paths that
once crashed (the ELBO monitor)."""

import json

import pytest
import torch

from sdeflow import cli
from sdeflow.storage import checkpoints as ckpt
from sdeflow.commands.train import resolve_recipe
from sdeflow.data import DATASETS
from sdeflow.engine.hooks import read_log
from sdeflow.experiments.images import CPU_BUDGET_RECIPE
from sdeflow.training import OBJECTIVES

from training_helpers import single_thread, train_args, write_cifar_batches  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def _resolved(*extra):
    args = cli.build_parser().parse_args(["train", "--dataset", "mnist", "--data-root", "d", "--out", "o", *extra])
    resolve_recipe(args)
    return args


def test_without_steps_the_cpu_budget_recipe_applies():
    args = _resolved()
    assert (args.steps, args.max_seconds, args.fit_schedule) == (
        CPU_BUDGET_RECIPE["steps"], CPU_BUDGET_RECIPE["max_seconds"], CPU_BUDGET_RECIPE["fit_schedule"])


def test_explicit_steps_run_to_the_end_unless_a_limit_is_given():
    args = _resolved("--steps", "20000")
    assert (args.steps, args.max_seconds, args.fit_schedule) == (20000, None, False)
    args = _resolved("--steps", "20000", "--max-seconds", "60", "--fit-schedule")
    assert (args.steps, args.max_seconds, args.fit_schedule) == (20000, 60.0, True)


def test_max_seconds_zero_means_no_limit():
    args = _resolved("--max-seconds", "0")
    assert args.max_seconds is None and args.steps == CPU_BUDGET_RECIPE["steps"]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_an_objective_sets_its_recipe_and_explicit_flags_win(objective):
    args = _resolved("--objective", objective)
    settings = OBJECTIVES[objective].settings
    assert {key: getattr(args, key) for key in settings} == dict(settings)
    other = "identity" if settings["transform"] != "identity" else "logit"
    args = _resolved("--objective", objective, "--transform", other, "--weighting", "noise")
    assert args.transform == other and args.weighting == "noise"
    assert args.time_sampling == settings["time_sampling"]


def test_the_default_objective_is_the_likelihood_recipe():
    args = _resolved()
    assert (args.transform, args.weighting, args.time_sampling) == ("logit", "likelihood", "importance")


def test_flips_follow_the_data_set_unless_given():
    assert DATASETS["cifar10"].mirror_symmetric and not DATASETS["mnist"].mirror_symmetric
    assert _resolved().flip is None  # train_images asks the data set
    assert _resolved("--flip").flip is True and _resolved("--no-flip").flip is False


def test_explicit_steps_are_not_cut_by_the_budget_and_the_elbo_monitor_runs(tmp_path):
    root = write_cifar_batches(tmp_path / "data", n_train=8, n_test=2)
    run = tmp_path / "run"
    code = cli.main(train_args(root, run, 3, "--monitor-every", "2", "--monitor-batch", "2", "--monitor-slices", "1"))
    assert code == 0
    assert [s for s, _ in ckpt.list_checkpoints(run)][-1] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if any("elbo" in key or "bits" in key for key in r)]
    assert monitored, records
    state = ckpt.load_checkpoint(run / "ckpt-00000003.pt")
    assert state["trainer"]["train_config"]["max_seconds"] is None


def test_fid_every_logs_fid_of_ema_samples_and_draws_its_curve(tmp_path):
    from sdeflow.metrics import ClassifierNet, save_classifier

    torch.manual_seed(0)
    root = write_cifar_batches(tmp_path / "data", n_train=8, n_test=2)
    classifier = save_classifier(ClassifierNet(in_channels=3, image_size=32, width=2, feature_dim=4),
                                 tmp_path / "classifier.pt")
    run = tmp_path / "run"
    code = cli.main(train_args(root, run, 4, "--fid-every", "2", "--fid-n-samples", "6", "--fid-features",
                               str(classifier)))
    assert code == 0
    records = [r for r in read_log(run / "metrics.jsonl") if r.get("event") == "fid"]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["fid"] > 0 and r["n_samples"] == 6 and r["features"] == "classifier" for r in records)
    assert (run / "fid.png").read_bytes()[:4] == b"\x89PNG"


def test_fid_every_without_features_is_one_line_exit_2(tmp_path, capsys):
    root = write_cifar_batches(tmp_path / "data", n_train=8, n_test=2)
    assert cli.main(train_args(root, tmp_path / "run", 2, "--fid-every", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fid_features" in err[0]
