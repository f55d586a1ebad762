"""``sdeflow train | eval | sample`` end to end on tiny CIFAR-format data, and their user errors."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from sdeflow.training import objectives

from sdeflow.storage import checkpoints as ckpt
import sdeflow
from sdeflow import cli
from sdeflow.experiments.images import sample_images
from sdeflow.engine import distributed

from training_helpers import one_thread, single_thread, train_args, write_cifar_batches

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_images")
    root = write_cifar_batches(base / "data", n_train=16, n_test=6)
    run = base / "run"
    with one_thread():
        code = cli.main(train_args(root, run, 2, "--sample-every", "2", "--sample-n", "4", "--sample-steps", "3"))
    assert code == 0
    return root, run


@pytest.mark.parametrize("command", ["train", "eval", "sample"])
def test_help_explains_every_flag(capsys, command):
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text


def test_train_writes_checkpoint_log_and_sample_grid(trained):
    root, run = trained
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    png = run / "samples-00000002.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    state = ckpt.load_checkpoint(run / "ckpt-00000002.pt")
    assert state["config"]["dataset"] == "cifar10" and state["config"]["net"]["base_channels"] == 4
    assert state["config"]["data"] == {"transform": "logit", "alpha": 0.05}


def test_resume_finds_latest_checkpoint_and_refuses_to_overwrite(tmp_path, capsys, trained):
    root, _ = trained
    run = tmp_path / "run"
    assert cli.main(train_args(root, run, 2)) == 0
    before = (run / "ckpt-00000002.pt").read_bytes()
    assert cli.main(train_args(root, run, 4)) == 2  # no --resume: refused, nothing lost
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (run / "ckpt-00000002.pt").read_bytes() == before
    assert cli.main(train_args(root, run, 4, "--resume")) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]


def test_eval_prints_and_writes_json(tmp_path, capsys, trained):
    root, run = trained
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", run, "--dataset", "cifar10", "--data-root", root, "--split", "test",
            "--n-slices", "1", "--time-sampling", "importance", "--json", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr()
    line = printed.out.strip()
    result = json.loads(out.read_text())
    assert {"bpd", "bpd_se", "n_images", "seconds", "estimator", "tail_share", "tail_count", "kurtosis",
            "heavy_tailed"} <= set(result) and "nfe" not in result
    assert result["n_images"] == 6 and result["bpd"] > 0 and result["bpd_se"] > 0
    assert "bpd_per_image" not in result
    assert cli.main([str(a) for a in argv + ["--per-image"]]) == 0
    capsys.readouterr()
    per_image = json.loads(out.read_text())["bpd_per_image"]
    assert len(per_image) == 6 and sum(per_image) / 6 == pytest.approx(result["bpd"], rel=1e-9)
    assert cli.main([str(a) for a in argv[:-3] + ["--per-image"]]) == 2  # needs --json
    assert "--per-image writes to the --json file" in capsys.readouterr().err
    assert result["estimator"].startswith("ELBO from t_min 5.46")  # t_σ, where std/m is the quantization's σ
    assert result["estimator"].endswith(" (Gaussian decoder), importance time proposal q ∝ g²/v, Hutchinson "
                                        "divergence (rademacher probe), 1 slice per example, uniform dequantization")
    assert 0 < result["tail_share"] <= 1 and result["tail_count"] == 1 and result["kurtosis"] > 0
    assert result["heavy_tailed"] is False and "warning" not in printed.err  # 6 images: too few to flag
    assert line.startswith(f"test bits/dim: {result['bpd']:.4f} ± {result['bpd_se']:.4f} (6 images, "
                           f"{result['estimator']}, ")


@pytest.mark.parametrize("heavy", [True, False])
def test_eval_warns_on_stderr_when_the_standard_error_is_unreliable(tmp_path, capsys, monkeypatch, trained, heavy):
    root, run = trained
    from sdeflow.likelihood import evaluation

    def fake_evaluate_bpd(model, images, config, settings=None, **kwargs):
        return {"bpd": 3.5, "bpd_se": 0.12, "n_images": 846, "seconds": 1.0, "estimator": "ELBO, test",
                "tail_share": 0.83 if heavy else 0.09, "tail_count": 8, "kurtosis": 190.4 if heavy else 3.1,
                "heavy_tailed": heavy}

    monkeypatch.setattr(evaluation, "evaluate_bpd", fake_evaluate_bpd)
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", run, "--dataset", "cifar10", "--data-root", root, "--json", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == "test bits/dim: 3.5000 ± 0.1200 (846 images, ELBO, test, 1.0 s)"
    assert json.loads(out.read_text())["heavy_tailed"] is heavy
    if heavy:
        assert printed.err.strip() == (
            "sdeflow eval: warning: the standard error ± 0.1200 is unreliable: the per-image bits/dim are "
            "heavy-tailed, 8 of 846 images carry 83% of their variance (kurtosis 190; a Gaussian's is 3); "
            "more --n-slices average the estimator's own noise")
    else:
        assert printed.err == ""


def test_eval_ode_reports_nfe(tmp_path, capsys, monkeypatch, trained):
    """Plumbing only (the ODE likelihood itself is tested in test_training and test_model): a 2-step
    model is stiff near t = 0, so its adaptive solve costs thousands of evaluations."""
    root, run = trained
    from sdeflow.likelihood import estimators

    starts = []

    def cheap_ode(model, x, rtol, atol, generator, t_min, **kwargs):
        assert (rtol, atol) == (1e-3, 1e-3)
        starts.append(t_min)
        return model.sde.prior_log_prob(x), {"nfe": 7}

    monkeypatch.setattr(estimators, "log_prob_ode", cheap_ode)  # the ODE estimator's solve
    out = tmp_path / "ode.json"
    argv = ["eval", "--checkpoint", run / "ckpt-00000002.pt", "--dataset", "cifar10", "--data-root", root,
            "--bound", "ode", "--rtol", "1e-3", "--atol", "1e-3", "--limit", "2", "--json", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["nfe"] == 7 and result["n_images"] == 2
    assert 1e-5 < starts[-1] < 1e-4  # t_σ of the logit transform's quantization, for the VP SDE
    assert result["estimator"] == (f"probability-flow ODE from t_min {starts[-1]:g}, dopri5, rtol 0.001, atol 0.001, "
                                   f"Hutchinson divergence (rademacher probe), uniform dequantization")
    assert cli.main([str(a) for a in argv + ["--dequantization", "truncated-normal", "--t-min", "0.001"]]) == 0
    assert starts[-1] == 0.001
    assert json.loads(out.read_text())["estimator"].endswith("truncated-normal dequantization")
    assert "mean NFE 7" in capsys.readouterr().out


def test_eval_discrete_bound_with_analytic_variances_kept_in_a_json_file(tmp_path, capsys, trained):
    """Plumbing of --bound discrete (the bound itself is tested in test_discrete): the analytic variance
    is estimated on training images once, written to --variance-json, and read back by the next run."""
    root, run = trained
    out, variances = tmp_path / "discrete.json", tmp_path / "variances.json"
    argv = ["eval", "--checkpoint", run, "--dataset", "cifar10", "--data-root", root, "--bound", "discrete",
            "--chain-steps", "20", "--sampled-steps", "4", "--variance", "analytic", "--variance-images", "4",
            "--variance-json", variances, "--limit", "3", "--json", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["estimator"] == ("discrete-time bound on N = 20 steps (t_n = n·T/N), analytic reverse variances, "
                                   "4 steps per example drawn from a proposal fitted on 3 pilot examples, DDPM's "
                                   "discretized Gaussian decoder")
    assert result["n_images"] == 3 and result["nfe"] == 5 and result["bpd"] > 0
    state = json.loads(variances.read_text())
    assert set(state) == {"times", "gamma", "gamma_se"} and len(state["times"]) == 128
    variances.write_text(json.dumps({**state, "gamma": [0.5] * len(state["gamma"])}))
    assert cli.main([str(a) for a in argv]) == 0  # reads the file: a different Γ gives a different bound
    assert json.loads(out.read_text())["bpd"] != result["bpd"]
    bad = argv[:argv.index("--variance")] + ["--variance", "exact"] + argv[argv.index("--variance") + 2:]
    with pytest.raises(SystemExit) as stop:
        cli.main([str(a) for a in bad])
    assert stop.value.code == 2 and "invalid choice: 'exact'" in capsys.readouterr().err


def test_a_learned_variance_trains_from_the_command_line_and_scores_the_discrete_bound(tmp_path, capsys, trained):
    """--learned-variance: the checkpoint's network carries the head; eval --variance learned and
    sample --method ancestral --variance learned read it; a model without one is one line, exit 2."""
    root, plain = trained
    run, out = tmp_path / "run", tmp_path / "learned.json"
    with one_thread():
        assert cli.main(train_args(root, run, 2, "--learned-variance", "--chain-steps", "20")) == 0
    state = torch.load(ckpt.latest_checkpoint(run), weights_only=True)
    assert state["config"]["net"]["learned_variance"] is True
    assert state["trainer"]["train_config"]["chain_steps"] == 20
    argv = ["eval", "--dataset", "cifar10", "--data-root", root, "--bound", "discrete", "--chain-steps", "20",
            "--sampled-steps", "2", "--step-sampling", "uniform", "--variance", "learned", "--limit", "2",
            "--no-progress"]
    assert cli.main([str(a) for a in argv] + ["--checkpoint", str(run), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "learned reverse variances" in result["estimator"] and result["bpd"] > 0
    grid = tmp_path / "grid.png"
    sample = ["sample", "--checkpoint", run, "--n", "2", "--method", "ancestral", "--variance", "learned",
              "--n-steps", "3", "--out", grid]
    assert cli.main([str(a) for a in sample]) == 0 and grid.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli.main([str(a) for a in argv] + ["--checkpoint", str(plain)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learned-variance" in err and "Traceback" not in err


def test_sample_writes_grid(tmp_path, capsys, trained):
    _, run = trained
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", run, "--n", "4", "--method", "euler", "--lmbd", "0.5", "--n-steps", "3", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "wrote 4 samples" in capsys.readouterr().out


def test_eval_refuses_checkpoint_of_another_dataset(capsys, trained):
    root, run = trained
    assert cli.main(["eval", "--checkpoint", str(run), "--dataset", "mnist", "--data-root", str(root)]) == 2
    assert "trained on 'cifar10', not --dataset mnist" in capsys.readouterr().err


def test_batch_size_must_divide_across_processes(tmp_path, capsys, monkeypatch, trained):
    root, _ = trained
    import torch
    monkeypatch.setattr(distributed, "init_distributed", lambda device: (0, 3, torch.device("cpu")))
    assert cli.main(train_args(root, tmp_path / "run", 2)) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sdeflow train: error: batch_size 4 does not divide across 3 processes; use a multiple of 3"
    assert not (tmp_path / "run").exists()


def test_unwritable_output_is_one_line_exit_1(tmp_path, capsys, monkeypatch, trained):
    _, run = trained
    import errno

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    argv = ["sample", "--checkpoint", str(run), "--n", "2", "--n-steps", "2", "--out", str(tmp_path / "g.png")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "could not write" in err and "Permission denied" in err


def test_a_runtime_error_of_torch_is_one_line_exit_1(tmp_path, capsys, monkeypatch, trained):
    root, _ = trained

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details on a second line")

    monkeypatch.setattr(objectives, "dsm", out_of_memory)
    assert cli.main(train_args(root, tmp_path / "run", 2)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "sdeflow train: error: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_eval_and_sample_a_diffusers_model_from_its_folder(tmp_path, capsys, monkeypatch, trained):
    """--model diffusers:DIR: a UNet2DModel and its scheduler written by save_pretrained are measured and
    sampled by the same commands; the bound starts at its first trained step; without diffusers, one
    line says how to install it (exit 2)."""
    diffusers = pytest.importorskip("diffusers")
    root, _ = trained
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    spec, out = f"diffusers:{tmp_path / 'pipe'}", tmp_path / "eval.json"
    argv = ["eval", "--model", spec, "--dataset", "cifar10", "--data-root", root, "--limit", "2", "--n-slices", "1",
            "--json", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == spec and result["n_images"] == 2 and result["bpd"] > 0
    assert result["estimator"].startswith("ELBO from t_min 0.01 (Gaussian decoder)")  # t_1 = T/N, above t_σ
    grid = tmp_path / "grid.png"
    argv = ["sample", "--model", spec, "--n-samples", "2", "--n-steps", "3", "--method", "ddim", "--out", grid]
    assert cli.main([str(a) for a in argv]) == 0 and grid.stat().st_size > 0
    assert f"wrote 2 samples to {grid}" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    assert cli.main(["eval", "--model", spec, "--dataset", "cifar10", "--data-root", str(root), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sdeflow eval: error: diffusers is not installed: pip install sdeflow[diffusers]")


def test_a_diffusers_folder_with_pickled_or_corrupt_weights_is_one_line_exit_2(tmp_path, capfd):
    """--model diffusers:DIR whose weights are pickled (save_pretrained(safe_serialization=False)) is
    refused, naming --allow-pickle, and sampled with it; a corrupt weights file names the real reason.
    Each refusal is exactly one line of stderr (no diffusers warnings, no traceback), exit status 2."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100))
    pipeline.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    pipeline.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    grid = tmp_path / "grid.png"

    def sample(folder, *flags):
        capfd.readouterr()
        argv = ["sample", "--model", f"diffusers:{tmp_path / folder}", *flags, "--n-samples", "1", "--n-steps", "2",
                "--out", str(grid), "--no-progress"]
        status = cli.main(argv)
        return status, capfd.readouterr().err

    status, err = sample("pickled")
    assert status == 2 and err.count("\n") == 1 and err.startswith("sdeflow sample: error: --model diffusers:")
    assert "diffusion_pytorch_model.bin" in err and "--allow-pickle" in err
    status, err = sample("pickled", "--allow-pickle")
    assert status == 0 and err == "" and grid.stat().st_size > 0
    status, err = sample("corrupt")
    assert status == 2 and err.count("\n") == 1 and "Unable to load weights from checkpoint file" in err
    assert "config.json" not in err
    status, err = sample("corrupt", "--allow-pickle")  # the safetensors file is still the one read
    assert status == 2 and "Unable to load weights from checkpoint file" in err


def test_a_class_conditional_model_trains_and_samples_a_class_from_the_command_line(tmp_path, capsys, trained):
    """--class-conditional: the checkpoint's network has the data set's 10 classes and p_uncond; sample
    --class K --guidance W draws the class; --class on an unconditional model, a class out of range
    and --guidance alone are one line each, exit 2."""
    root, plain = trained
    run = tmp_path / "run"
    with one_thread():
        assert cli.main(train_args(root, run, 2, "--class-conditional", "--p-uncond", "0.2")) == 0
    state = torch.load(ckpt.latest_checkpoint(run), weights_only=True)
    assert state["config"]["net"]["num_classes"] == 10 and state["trainer"]["train_config"]["p_uncond"] == 0.2
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    base = ["sample", "--n", "2", "--method", "ddim", "--n-steps", "2", "--no-progress"]
    assert cli.main(base + ["--checkpoint", str(run), "--class", "3", "--guidance", "2", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG" and "class 3, guidance 2" in capsys.readouterr().out
    # --class all: one row of --n per class, the labels beside the samples; each row is its class's draw
    every = tmp_path / "every.npz"
    assert cli.main(base + ["--checkpoint", str(run), "--class", "all", "--guidance", "1", "--out", str(every)]) == 0
    assert "wrote 20 samples" in capsys.readouterr().out and every.with_suffix(".png").stat().st_size > 0
    with np.load(every) as saved:
        assert saved["samples"].shape == (20, 3, 32, 32)
        assert saved["labels"].tolist() == [k for k in range(10) for _ in range(2)]
        row3 = saved["samples"][6:8].astype(int)
    one = tmp_path / "one.npz"
    assert cli.main(base + ["--checkpoint", str(run), "--class", "3", "--guidance", "1", "--out", str(one),
                            "--n", "20"]) == 0
    with np.load(one) as saved:  # the same seed and positions: the same noise, class 3 at rows 6 and 7
        assert np.abs(saved["samples"][6:8].astype(int) - row3).max() <= 1 and "labels" not in saved
    model, config, _ = sdeflow.load_model(run)
    seen = []
    model.net.register_forward_pre_hook(lambda net, inputs: seen.append(inputs[2].clone()))
    labels = torch.tensor([4, 1, 1, 7])
    sample_images(model, config, 4, sdeflow.SamplerSettings(method="ddim", n_steps=2), labels=labels, guidance=2.0)
    assert len(seen) == 2 and all(s.tolist() == [4, 1, 1, 7] + [10] * 4 for s in seen)  # the class, then the null
    with pytest.raises(ValueError, match="labels must hold one class per sample"):
        sample_images(model, config, 3, labels=labels)
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", str(run), "--data-root", str(root), "--mask", "center",
                     "--class", "all", "--out", str(tmp_path / "x.png")]) == 2
    assert "--class all" in capsys.readouterr().err
    # conditional likelihoods and the diffusion classifier on the test split's labelled images
    data = ["--dataset", "cifar10", "--data-root", str(root), "--limit", "4", "--no-progress"]
    out = tmp_path / "cond.json"
    assert cli.main(["eval", "--checkpoint", str(run), *data, "--class-conditional", "--time-sampling", "importance",
                     "--n-slices", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits/dim of p(x | y)" in text and "I(x; y) per dimension" in text
    result = json.loads(out.read_text())
    assert result["n_images"] == 4 and result["information_bound"] == pytest.approx(math.log2(10) / 3072)
    assert cli.main(["eval", "--checkpoint", str(run), *data, "--class-conditional", "--every-class",
                     "--time-sampling", "importance", "--n-slices", "1", "--json", str(out)]) == 0
    assert "bits/dim of the mixture of the classes" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["mixture_information"] <= result["information_bound"] and 0 <= result["accuracy"] <= 1
    assert cli.main(["eval", "--checkpoint", str(run), *data, "--every-class"]) == 2
    assert "--every-class goes with --class-conditional" in capsys.readouterr().err
    out = tmp_path / "classify.json"
    assert cli.main(["classify", "--checkpoint", str(run), "--dataset", "cifar10", "--data-root", str(root),
                     "--limit", "4", "--n-slices", "1", "--rounds", "3", "--json", str(out)]) == 0
    assert "up to 3 rounds of 1 slices per class" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert 0 <= result["accuracy"] <= 1 and len(result["predictions"]) == 4 and result["nll"] >= 0
    assert 32 * 4 * 10 / 4 + 10 <= result["evaluations_per_image"] <= 32 * 4 * 10 / 4 + 30  # the plan, then rounds
    assert cli.main(["classify", "--checkpoint", str(plain), "--dataset", "cifar10", "--data-root", str(root)]) == 2
    assert "the model is unconditional" in capsys.readouterr().err
    for extra, message in ((["--checkpoint", str(plain), "--class", "1"], "--class needs a class-conditional model"),
                           (["--checkpoint", str(run), "--class", "10"], "--class must lie in [0, 9]"),
                           (["--checkpoint", str(run), "--guidance", "1"], "--guidance needs --class")):
        assert cli.main(base + extra + ["--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
