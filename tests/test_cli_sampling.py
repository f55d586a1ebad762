"""``sdeflow sample | inpaint | denoise`` end to end on a tiny CIFAR-format checkpoint, and their user errors."""

from __future__ import annotations

import re

import pytest

from sdeflow import cli
from sdeflow.samplers import METHODS
from sdeflow.samplers.grids import GRIDS
from training_helpers import one_thread, single_thread, train_args, write_cifar_batches  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny checkpoint and the data it was trained on."""
    base = tmp_path_factory.mktemp("cli_sampling")
    root = write_cifar_batches(base / "data", n_train=16, n_test=6)
    run = base / "run"
    with one_thread():
        assert cli.main(train_args(root, run, 2)) == 0
    return root, run


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def test_sample_with_a_method_and_schedule_prints_the_nfe(tmp_path, capsys, trained):
    _, run = trained
    out = tmp_path / "grid.png"
    code, stdout, err = _run(["sample", "--checkpoint", run, "--n-samples", 3, "--method", "dpm++2m",
                              "--grid", "logsnr", "--n-steps", 3, "--out", out, "--no-progress", "--no-clip"], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert stdout == f"wrote 3 samples to {out} (dpm++2m, 3 steps, NFE 3)"


def test_sample_passes_the_method_options(tmp_path, capsys, trained):
    _, run = trained
    out = tmp_path / "pc.png"
    code, stdout, err = _run(["sample", "--checkpoint", run, "--n", 2, "--method", "pc", "--n-corrector", 2,
                              "--snr", "0.1", "--n-steps", 2, "--out", out, "--no-progress", "--no-clip"], capsys)
    assert code == 0, err
    # the options it ran with; 2 steps × (1 predictor + 2 corrector) evaluations
    assert stdout.endswith("(pc (n corrector 2, snr 0.1), 2 steps, NFE 6)")


def test_inpaint_and_denoise_with_heun(tmp_path, capsys, trained):
    root, run = trained
    common = ["--checkpoint", run, "--data-root", root, "--n-images", 2, "--n-samples", 2, "--method", "heun",
              "--n-steps", 2, "--no-progress"]
    out = tmp_path / "inpaint.png"
    code, stdout, err = _run(["inpaint", *common, "--mask", "center", "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG"
    # Heun at its default λ = 1 on its default Karras grid to t_min > 0: 2 evaluations a step.
    assert stdout == f"wrote {out}: 2 images x 2 samples, guided (heun, 2 steps, NFE 4)"
    out = tmp_path / "denoise.png"
    code, stdout, err = _run(["denoise", *common, "--snr", 1, "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: 2 images x 2 samples, noise_std=\S+ \(heun, 2 steps, NFE 4\)",
                        stdout), stdout


@pytest.mark.parametrize("extra,message", [
    (["--method", "rk45"], "argument --method: invalid choice: 'rk45'"),
    (["--grid", "cosine"], "argument --grid: invalid choice: 'cosine'"),
    (["--n-steps", "-3"], "argument --n-steps: n_steps must be a positive integer; got -3"),
    (["--n-steps", "2.5"], "argument --n-steps: n_steps must be a positive integer; got '2.5'"),
    (["--steps", "3"], "unrecognized arguments: --steps 3"),  # optimizer steps are `sdeflow train`'s
    (["--method", "heun", "--n-corrector", "2"],
     "method 'heun' does not accept the option(s) n_corrector; it accepts: none ('n_corrector' is an option of 'pc')"),
    (["--method", "pc", "--n-corrector", "-1"], "argument --n-corrector: n_corrector must be an integer >= 0"),
    (["--method", "dpm2", "--lmbd", "0.5"], "method 'dpm2' supports λ = 1 only (probability-flow ODE); got lmbd=0.5"),
    (["--method", "euler", "--lmbd", "nan"], "method 'euler' supports any λ in [0, 1]; got lmbd=nan"),
    (["--method", "dpm3", "--t-min", "0"], "method 'dpm3' needs t_min in (0, t_start=1.0)"),
    (["--grid", "karras", "--t-min", "0"], "grid 'karras' needs t_min in (0, t_start=1.0)"),
    (["--t-min", "1"], "t_min must lie in [0, t_start=1.0); got 1.0"),
    (["--seed", "-1"], "argument --seed: seed must be an integer >= 0; got -1"),
    (["--threshold", "0"], "argument --threshold: threshold must be a percentile in (0, 100]"),
    (["--threshold", "101"], "argument --threshold: threshold must be a percentile in (0, 100]"),
    (["--threshold", "p99"], "argument --threshold: threshold must be a percentile in (0, 100]"),
    (["--clip", "1"], "unrecognized arguments: 1"),
    (["--out", "g.npy"], "--out must name a .png or .npz file; got g.npy"),
])
def test_sample_bad_values_are_one_line_exit_2(tmp_path, capsys, trained, extra, message):
    _, run = trained
    argv = ["sample", "--checkpoint", str(run), "--out", str(tmp_path / "g.png"), "--n-steps", "2", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "g.png").exists()


def test_sample_clips_thresholds_and_writes_npz(tmp_path, capsys, trained):
    """--clip and --threshold keep x̂₀ in the checkpoint's transform range and say so; --out FILE.npz keeps
    the uint8 samples (N, C, H, W) under "samples" and writes the grid beside it, FILE.png."""
    import numpy as np

    from sdeflow.storage.checkpoints import load_model, resolve_checkpoint
    from sdeflow.data.transforms import data_range

    _, run = trained
    _, config, _ = load_model(resolve_checkpoint(str(run)))
    low, high = data_range(config["data"])
    where = f"[{low:.4g}, {high:.4g}]"
    out = tmp_path / "samples.npz"
    common = ["sample", "--checkpoint", run, "--n", 3, "--method", "ddim", "--n-steps", 2, "--no-progress"]
    code, stdout, err = _run([*common, "--clip", "--out", out], capsys)
    assert code == 0, err
    assert stdout == (f"wrote 3 samples to {out} and their grid to {out.with_suffix('.png')} "
                      f"(ddim, 2 steps, NFE 2, x̂₀ clipped to {where})")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with np.load(out) as archive:
        assert archive.files == ["samples"]
        clipped = archive["samples"]
    assert clipped.dtype == np.uint8 and clipped.shape == (3, 3, 32, 32)
    assert not list(tmp_path.glob("*.tmp"))
    code, stdout, err = _run([*common, "--threshold", 99.5, "--out", tmp_path / "t.npz"], capsys)
    assert code == 0, err
    assert stdout.endswith(f"(ddim, 2 steps, NFE 2, x̂₀ thresholded at p99.5 in {where})")
    code, _, err = _run([*common, "--no-clip", "--out", tmp_path / "plain.npz"], capsys)
    assert code == 0, err
    with np.load(tmp_path / "plain.npz") as archive:
        plain = archive["samples"]
    # A 2-step DDIM of a 2-step model: x̂₀ leaves the range, so clipping changes the images.
    assert not np.array_equal(plain, clipped)


def test_inpaint_and_denoise_take_clip_and_threshold(tmp_path, capsys, trained):
    root, run = trained
    common = ["--checkpoint", run, "--data-root", root, "--n-images", 1, "--n-samples", 1, "--method", "ddim",
              "--n-steps", 2, "--no-progress"]
    code, stdout, err = _run(["inpaint", *common, "--mask", "center", "--clip", "--out", tmp_path / "i.png"], capsys)
    assert code == 0, err
    assert re.fullmatch(r"wrote .*i\.png: 1 images x 1 samples, guided \(ddim, 2 steps, NFE 2, x̂₀ clipped to "
                        r"\[\S+, \S+\]\)", stdout), stdout
    code, stdout, err = _run(["denoise", *common, "--snr", 1, "--threshold", 95, "--out", tmp_path / "d.png"], capsys)
    assert code == 0, err
    assert re.search(r"x̂₀ thresholded at p95 in \[\S+, \S+\]\)$", stdout), stdout
    assert (tmp_path / "i.png").exists() and (tmp_path / "d.png").exists()


def test_missing_checkpoint_and_bad_conditional_input_exit_2(tmp_path, capsys, trained):
    root, _ = trained
    missing = tmp_path / "nope.pt"
    code, _, err = _run(["sample", "--checkpoint", missing, "--out", tmp_path / "g.png"], capsys)
    assert code == 2 and err == f"sdeflow sample: error: --checkpoint: checkpoint {missing} does not exist"
    assert cli.main(["inpaint", "--checkpoint", str(missing), "--data-root", str(root), "--mask", "left-half",
                     "--out", str(tmp_path / "a.png")]) == 2
    assert cli.main(["denoise", "--checkpoint", str(missing), "--data-root", str(root), "--snr", "1",
                     "--out", str(tmp_path / "a.txt")]) == 2
    for argv in (["denoise", "--checkpoint", str(missing), "--data-root", str(root), "--snr", "-1", "--out", "b.png"],
                 ["inpaint", "--checkpoint", str(missing), "--data-root", str(root), "--mask", "top", "--out", "c.png"],
                 ["inpaint", "--checkpoint", str(missing), "--data-root", str(root), "--mask", "random:2",
                  "--out", "c.png"],
                 ["inpaint", "--checkpoint", str(missing), "--mask", "left-half", "--out", "c.png"]):  # no --data-root
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all("error" in line for line in err), err


def test_bad_data_root_is_exit_2(tmp_path, capsys, trained):
    _, run = trained
    code, _, err = _run(["denoise", "--checkpoint", run, "--data-root", tmp_path / "none", "--noise-std", "0.5",
                         "--out", tmp_path / "d.png"], capsys)
    assert code == 2 and err.endswith("is not a directory") and "\n" not in err


def test_help_is_built_from_the_registries(capsys):
    parser = cli.build_parser()
    for command in ("sample", "inpaint", "denoise"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name, spec in METHODS.items():
            assert f"{name}: order {spec.order}" in text
        assert all(grid in text for grid in GRIDS)
        # The corrector's snr is --snr, except where denoise has its own --snr (the observation's).
        assert "--n-corrector" in text
        assert ("--method-snr" if command == "denoise" else "--snr") in text


def test_a_registered_method_appears_in_the_command_line(tmp_path, capsys, trained):
    from sdeflow.samplers import Method, Option, register_method

    _, run = trained
    euler = METHODS["euler"]

    def damped_euler(model, x, t, t_next, lmbd, generator, last, state):
        x_next, nfe = euler.step(model, x, t, t_next, lmbd, generator, last, state)
        return state["damping"] * x_next, nfe

    def check_damping(name, value):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must lie in (0, 1]; got {value!r}")
        return float(value)

    register_method("test-damped-euler", Method(damped_euler, order="1", nfe_per_step=1, lmbd="any λ in [0, 1]",
                                                options={"damping": Option(1.0, check_damping, "shrink factor")}))
    try:
        out = tmp_path / "damped.png"
        code, stdout, err = _run(["sample", "--checkpoint", run, "--n", 2, "--method", "test-damped-euler",
                                  "--damping", "0.9", "--n-steps", 2, "--out", out, "--no-progress", "--no-clip"],
                                 capsys)
        assert code == 0, err
        assert stdout.endswith("(test-damped-euler (damping 0.9), 2 steps, NFE 2)")
        with pytest.raises(SystemExit):
            cli.main(["sample", "--checkpoint", str(run), "--out", str(out), "--method", "test-damped-euler",
                      "--damping", "2"])
        assert "damping must lie in (0, 1]" in capsys.readouterr().err
    finally:
        del METHODS["test-damped-euler"]


@pytest.mark.parametrize("command", ["sample", "inpaint", "denoise"])
def test_samples_that_diverge_are_one_line_exit_1(tmp_path, capsys, trained, command):
    """Every sampling command applies the same non-finite check: a run-time failure, not bad input."""
    from sdeflow.samplers import Method, register_method

    root, run = trained
    euler = METHODS["euler"]

    def diverging_euler(model, x, t, t_next, lmbd, generator, last, state):
        x_next, nfe = euler.step(model, x, t, t_next, lmbd, generator, last, state)
        return x_next * float("inf") if last else x_next, nfe

    register_method("test-diverging", Method(diverging_euler, order="1", nfe_per_step=1, lmbd="any λ in [0, 1]"))
    try:
        out = tmp_path / "x.png"
        argv = [command, "--checkpoint", run, "--out", out, "--method", "test-diverging", "--n-steps", 2,
                "--no-progress"]
        if command != "sample":
            argv += ["--data-root", root, "--n-images", 1, "--n-samples", 1]
        argv += {"sample": ["--n", 2], "inpaint": ["--mask", "center"], "denoise": ["--snr", 1]}[command]
        code, _, err = _run(argv, capsys)
        assert code == 1, err
        assert re.fullmatch(rf"sdeflow {command}: error: sampling diverged: \d+ non-finite values after 2 "
                            r"test-diverging steps \(try more --n-steps or another --method\)", err), err
        assert not out.exists()
    finally:
        del METHODS["test-diverging"]


@pytest.mark.parametrize("command", ["sample", "fid"])
def test_sample_and_fid_default_to_the_measured_sampler(command):
    from sdeflow.experiments.images import DEFAULT_SAMPLER

    base = {"sample": ["sample", "--checkpoint", "RUN", "--out", "g.png"],
            "fid": ["fid", "--checkpoint", "RUN", "--dataset", "mnist", "--data-root", "D", "--features", "classifier"]}
    from sdeflow.commands.sampling import sampler_settings_from_args

    config = {"data": {"transform": "centered", "alpha": 0.05}}

    def settings(*flags):
        return sampler_settings_from_args(cli.build_parser().parse_args([*base[command], *flags]), config)

    default = settings()
    assert (default.method, default.n_steps, default.clip) == (DEFAULT_SAMPLER["method"], DEFAULT_SAMPLER["n_steps"],
                                                               (-1.0, 1.0))
    assert settings("--no-clip").clip is None
    # Clipping is on by default where it measured better: not for Euler–Maruyama, unless asked for.
    assert settings("--method", "ddim").clip == (-1.0, 1.0)
    assert settings("--method", "euler").clip is None
    assert settings("--method", "euler", "--clip").clip == (-1.0, 1.0)
