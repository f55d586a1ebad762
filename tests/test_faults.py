"""Issue 7: every reliability promise, each proved by injecting its fault.

SIGKILL (incl. mid-checkpoint-write) · exact resume · SIGTERM/Ctrl-C · non-finite loss/gradient ·
disk full / unwritable directory · unsafe, truncated or foreign checkpoints · bad data ·
nonsense command-line arguments · reproducible evaluation.
"""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from sdeflow.training import objectives

import sdeflow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdeflow.storage import checkpoints as ckpt
from sdeflow.experiments import images as images_app
from sdeflow import cli
from sdeflow.model import PluginReverseSDE

from training_helpers import (OnRecord, single_thread, one_thread, REPO, cli_env, tiny_config, tiny_images, tiny_model,
                              tiny_train_config, train_args, write_cifar_batches)

pytestmark = pytest.mark.usefixtures("single_thread")

DRIVER = REPO / "tests" / "fault_driver.py"


def _losses(run_dir):
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written by the child right now
            pass
    return [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r]


def _final_state(run_dir):
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    return state


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def _train_tiny(run, resume=False):
    config = tiny_config()
    with one_thread():
        images_app.train_images(tiny_model(config), tiny_images(), run,
                       tiny_train_config(steps=6, checkpoint_every=2, keep_checkpoints=10), config, resume=resume)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run that the interrupted ones must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train_tiny(run)
    return run


# ---- killed at any moment ----------------------------------------------------------------------
def test_sigkill_mid_checkpoint_write_keeps_last_checkpoint_and_resume_is_bit_identical(tmp_path, reference_run):
    run = tmp_path / "run"
    child = subprocess.run([sys.executable, str(DRIVER), str(run), "6", "--kill-in-write", "2"],
                           env=cli_env(), capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # Died writing step 4: step 2 is complete and loads, step 4 never appeared under its name.
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert ckpt.load_checkpoint(run / "ckpt-00000002.pt", expected_config=tiny_config())["step"] == 2
    assert list(run.glob(".ckpt-writing-*.tmp")), "the half-written temporary should be the only trace"

    _train_tiny(run, resume=True)
    assert not list(run.glob(".ckpt-writing-*.tmp"))
    assert _losses(run) == _losses(reference_run)  # exact float equality, steps 1..6
    _assert_same_state(_final_state(run), _final_state(reference_run))


def test_sigkill_at_an_arbitrary_moment_then_resume(tmp_path, reference_run):
    """Kill the child at whatever it is doing once it has logged step 3 (it may be computing, logging
    or writing): the newest checkpoint loads and resuming reproduces the reference bit for bit."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(DRIVER), str(run), "6"], env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if (run / "metrics.jsonl").exists() and any(s >= 3 for s, _ in _losses(run)):
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None
    assert ckpt.load_checkpoint(latest, expected_config=tiny_config())["step"] >= 2
    _train_tiny(run, resume=True)
    assert _losses(run) == _losses(reference_run)
    _assert_same_state(_final_state(run), _final_state(reference_run))


# ---- SIGTERM / Ctrl-C -----------------------------------------------------------------------------
@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_checkpoint_of_current_step_and_exits_clearly(tmp_path, monkeypatch, capsys, signum, status):
    root = write_cifar_batches(tmp_path / "data")
    run = tmp_path / "run"
    real_train = images_app.train_images

    def train_and_signal_at_step_3(*args, **kwargs):
        def on_event(record):
            if record.get("step") == 3 and "loss" in record:
                os.kill(os.getpid(), signum)
        return real_train(*args, **{**kwargs, "hooks": [*kwargs.get("hooks", []), OnRecord(on_event)]})

    monkeypatch.setattr(images_app, "train_images", train_and_signal_at_step_3)
    code = cli.main(train_args(root, run, 1000, "--checkpoint-every", "100"))
    err = capsys.readouterr().err.strip()
    assert code == status
    name = signal.Signals(signum).name
    assert err == f"sdeflow train: received {name} at step 3: checkpoint written to {run / 'ckpt-00000003.pt'}; " \
                  f"continue with --resume"
    assert ckpt.load_checkpoint(run / "ckpt-00000003.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored


# ---- non-finite loss or gradient ------------------------------------------------------------------
def _poison_loss(monkeypatch, bad_calls):
    calls = {"n": 0}
    real = objectives.dsm

    def dsm(model, x, **kwargs):
        calls["n"] += 1
        loss = real(model, x, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(objectives, "dsm", dsm)


def test_non_finite_loss_step_is_skipped_and_counted(tmp_path, monkeypatch):
    config = tiny_config()
    model = tiny_model(config)
    _poison_loss(monkeypatch, bad_calls={2})
    before = {}

    def remember(record):
        if record.get("step") == 1 and "loss" in record:
            before.update({k: v.clone() for k, v in model.state_dict().items()})

    result = images_app.train_images(model, tiny_images(), tmp_path / "run", tiny_train_config(steps=3), config,
                            hooks=[OnRecord(remember)])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("event") == "skipped"]
    assert result["skipped"] == 1 and len(skipped) == 1 and skipped[0]["step"] == 2
    assert [r["skipped"] for r in records if "loss" in r and "event" not in r] == [0, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_is_skipped(tmp_path):
    config = tiny_config()
    model = tiny_model(config)
    calls = {"n": 0}

    def poison_grad(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    next(model.parameters()).register_hook(poison_grad)
    result = images_app.train_images(model, tiny_images(), tmp_path / "run", tiny_train_config(steps=2), config)
    assert result["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_non_finite_steps_stop_training_and_keep_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = write_cifar_batches(tmp_path / "data")
    run = tmp_path / "run"
    _poison_loss(monkeypatch, bad_calls=set(range(3, 100)))
    code = cli.main(train_args(root, run, 20, "--max-bad-steps", "3"))
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "\n" not in err and "3 consecutive steps had a non-finite loss or gradient (last at step 5)" in err
    assert "last good checkpoint" in err and "ckpt-00000002.pt" in err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert ckpt.load_checkpoint(run / "ckpt-00000002.pt")["step"] == 2


def test_nan_in_toy_data_refused():
    from sdeflow import VPSDE

    model = PluginReverseSDE(VPSDE(), torch.nn.Linear(2, 2))
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 non-finite value"):
        sdeflow.dsm(model, x)
    with pytest.raises(ValueError, match="x contains 1 non-finite value"):
        sdeflow.elbo(model, x, time_sampling="uniform")


# ---- disk full / unwritable output ----------------------------------------------------------------
@pytest.mark.parametrize("fault,message", [
    ("disk-full", "No space left on device"),
    ("unwritable", "Permission denied"),
])
def test_write_failure_mid_run_gives_clear_error_and_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                fault, message):
    root = write_cifar_batches(tmp_path / "data")
    run = tmp_path / "run"
    real_save = ckpt.save_checkpoint

    def save(path, state):
        if state["step"] >= 4:
            if fault == "disk-full":
                monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(
                    OSError(errno.ENOSPC, "No space left on device")))
            else:
                monkeypatch.setattr("tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(
                    PermissionError(errno.EACCES, "Permission denied")))
        return real_save(path, state)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    code = cli.main(train_args(root, run, 8))
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "\n" not in err and message in err and "ckpt-00000004.pt" in err
    assert f"previous checkpoint {run / 'ckpt-00000002.pt'} is intact" in err
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert not list(run.glob(".ckpt-writing-*"))
    assert ckpt.load_checkpoint(run / "ckpt-00000002.pt")["step"] == 2


# ---- unsafe, truncated, foreign checkpoints: refused, nothing runs ----------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    root = write_cifar_batches(base / "data")
    run = base / "run"
    with one_thread():
        assert cli.main(train_args(root, run, 2)) == 0
    return root, run


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("damage", ["truncated", "malicious", "other-config"])
@pytest.mark.parametrize("command", ["eval", "sample", "train-resume"])
def test_bad_checkpoint_refused_by_every_command(tmp_path, capsys, cli_run, damage, command):
    root, good_run = cli_run
    run = tmp_path / "run"
    run.mkdir()
    path = run / "ckpt-00000002.pt"
    good = ckpt.load_checkpoint(good_run / "ckpt-00000002.pt")
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        data = (good_run / "ckpt-00000002.pt").read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "malicious":
        good["model"] = {"payload": _RunsCode(str(marker))}
        with open(path, "wb") as handle:
            pickle.dump(good, handle, protocol=2)
    else:
        good["config"]["net"]["base_channels"] = 8
        torch.save(good, path)
    before = path.read_bytes()
    if command == "eval":
        argv = ["eval", "--checkpoint", path, "--dataset", "cifar10", "--data-root", root]
    elif command == "sample":
        argv = ["sample", "--checkpoint", path, "--n", "2", "--n-steps", "2", "--out", tmp_path / "grid.png"]
    else:
        argv = train_args(root, run, 4, "--resume")
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    expected = {"truncated": "truncated or corrupt", "malicious": "could run code",
                "other-config": "another model configuration" if command == "train-resume" else "does not fit"}
    assert expected[damage] in err
    assert not marker.exists()
    assert path.read_bytes() == before  # nothing already written is lost
    assert not (tmp_path / "grid.png").exists()


# ---- bad data --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-shape"])
def test_bad_data_batch_refused_naming_the_file(tmp_path, capsys, damage):
    root = write_cifar_batches(tmp_path / "data")
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:1000])
    elif damage == "garbage":
        batch.write_bytes(os.urandom(5000))
    else:
        with open(batch, "wb") as handle:
            pickle.dump({b"data": torch.zeros(4, 100, dtype=torch.uint8).numpy(), b"labels": [0] * 4}, handle,
                        protocol=2)
    code = cli.main([str(a) for a in train_args(root, tmp_path / "run", 2)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert "data_batch_1" in err
    assert not (tmp_path / "run").exists() or not ckpt.list_checkpoints(tmp_path / "run")


def test_wrong_image_shape_refused_by_library(tmp_path):
    config = tiny_config()
    with pytest.raises(ValueError, match=r"must have shape \(N, 1, 8, 8\) for this model; got \(4, 1, 9, 9\)"):
        images_app.train_images(tiny_model(config), torch.zeros(4, 1, 9, 9, dtype=torch.uint8), tmp_path / "r",
                       tiny_train_config(), config)


# ---- nonsense command-line arguments ---------------------------------------------------------------
BAD_ARGUMENTS = {
    "train": [
        [], ["--dataset", "imagenet", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o"],
        ["--dataset", "cifar10", "--data-root", "/nonexistent", "--steps", "1", "--batch-size", "1", "--out", "o"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "0", "--batch-size", "1", "--out", "o"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "ten", "--batch-size", "1", "--out", "o"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "-4", "--out", "o"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--preset", "huge"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--lr", "nan"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--lr", "-1"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--ema-decay", "1"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o",
         "--time-sampling", "sometimes"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--precision", "fp8"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--device", "tpu"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o",
         "--channel-mult", "1,x"],
        ["--dataset", "cifar10", "--data-root", "x", "--steps", "1", "--batch-size", "1", "--out", "o", "--bogus"],
        ["--dataset", "cifar10", "--data-root", "/nonexistent", "--steps", "1", "--batch-size", "1", "--out", "o",
         "--resume"],
    ],
    "eval": [
        [], ["--checkpoint", "/nonexistent.pt", "--dataset", "cifar10", "--data-root", "x"],
        ["--checkpoint", "c.pt", "--dataset", "svhn", "--data-root", "x"],
        ["--checkpoint", "c.pt", "--dataset", "cifar10", "--data-root", "x", "--n-slices", "0"],
        ["--checkpoint", "c.pt", "--dataset", "cifar10", "--data-root", "x", "--split", "valid"],
        ["--checkpoint", "c.pt", "--dataset", "cifar10", "--data-root", "x", "--time-sampling", "fancy"],
        ["--checkpoint", "c.pt", "--dataset", "cifar10", "--data-root", "x", "--rtol", "0"],
        ["--checkpoint", "c.pt", "--dataset", "cifar10", "--data-root", "x", "--batch-size", "1.5"],
    ],
    "sample": [
        [], ["--checkpoint", "/nonexistent.pt", "--out", "g.png"],
        ["--checkpoint", "c.pt", "--out", "g.png", "--n", "0"],
        ["--checkpoint", "c.pt", "--out", "g.png", "--lmbd", "2"],
        ["--checkpoint", "c.pt", "--out", "g.png", "--lmbd", "inf"],
        ["--checkpoint", "c.pt", "--out", "g.png", "--steps", "-3"],
        ["--checkpoint", "c.pt", "--out", "grid.jpg"],
        ["--checkpoint", "c.pt", "--out", "/nonexistent/dir/g.png"],
        ["--checkpoint", "c.pt", "--out", "g.png", "--seed", "-1"],
    ],
}


def _run_in_process(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


@pytest.mark.parametrize("command,args", [(c, a) for c, table in BAD_ARGUMENTS.items() for a in table])
def test_bad_arguments_exit_2_with_one_line(tmp_path, monkeypatch, capsys, command, args):
    monkeypatch.chdir(tmp_path)
    code, err = _run_in_process([command, *args], capsys)
    assert code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # nothing was written


VOCABULARY = ["--dataset", "cifar10", "mnist", "--data-root", "/nonexistent", "--steps", "--batch-size", "--out",
              "o", "--checkpoint", "c.pt", "--n", "--lmbd", "--n-slices", "--seed", "--lr", "--resume", "--ode",
              "-1", "0", "2", "1e9", "nan", "x", "", "--", "--preset", "small", "--split", "test", "--json", "--keep"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(BAD_ARGUMENTS)), args=st.lists(st.sampled_from(VOCABULARY), max_size=10))
def test_random_arguments_never_traceback(tmp_path, capsys, command, args):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, err = _run_in_process([command, *args], capsys)
    finally:
        os.chdir(cwd)
    assert code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err


def test_bad_arguments_from_the_console_script(tmp_path):
    """The same through a real process: status 2, one line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "sdeflow", "train", "--dataset", "cifar10", "--data-root",
                             str(tmp_path / "none"), "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


# ---- reproducible evaluation -------------------------------------------------------------------------
def test_eval_reproducible_to_the_last_printed_digit(tmp_path, capsys, cli_run):
    root, run = cli_run
    outputs = []
    for i in range(2):
        argv = ["eval", "--checkpoint", run, "--dataset", "cifar10", "--data-root", root, "--seed", "7",
                "--n-slices", "2", "--limit", "3", "--json", tmp_path / f"e{i}.json", "--no-progress"]
        assert cli.main([str(a) for a in argv]) == 0
        outputs.append(capsys.readouterr().out.split(" images")[0])
    assert outputs[0] == outputs[1] and "bits/dim" in outputs[0]
    first, second = (json.loads((tmp_path / f"e{i}.json").read_text()) for i in range(2))
    assert first["bpd"] == second["bpd"] and first["bpd_se"] == second["bpd_se"]
