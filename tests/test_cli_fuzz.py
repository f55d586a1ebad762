"""The command line's promise under random input: every subcommand, given random argument lists built
from its own flags (read from the parser) mixed with junk values, ends with exit status 0, 1 or 2,
never a traceback, and a failure (1 or 2) is exactly one line on stderr.

Every example starts from settings that make a run which gets through tiny (a 1-step toy run, a
checkpoint of a tiny U-Net, 2 sampler steps), then appends the random arguments, which override them.
Integer flags only ever get small valid values (or invalid ones), so no example launches long work.
The toy's figures are skipped (they take seconds and are tested in test_swissroll.py)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdeflow import cli
from sdeflow.experiments import toy as toy_app

from training_helpers import one_thread, train_args, write_cifar_batches



def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(action.choices)


SUBPARSERS = _subparsers()


def _present(name: str, pairs: list) -> list:
    """The (flag, value) pairs whose flag the subcommand has (the ELBO's slices flag was renamed)."""
    have = {flag for action in SUBPARSERS[name]._actions for flag in action.option_strings}
    return [token for flag, value in pairs if flag in have for token in (flag, value) if token is not None]


SWISSROLL_TINY = _present("swissroll", [
    ("--steps", "1"), ("--batch-size", "8"), ("--n-samples", "20"), ("--n-likelihood", "10"), ("--sample-steps", "2"),
    ("--n-trajectories", "2"), ("--elbo-slices", "2"), ("--n-slices", "2"), ("--hidden", "4"), ("--blocks", "1"),
    ("--monitor-every", "0"), ("--no-progress", None), ("--max-seconds", "20")])
COMMANDS = ("swissroll", "train", "eval", "sample", "inpaint", "denoise", "classifier", "fid", "classify")


def test_every_command_is_fuzzed():
    assert set(SUBPARSERS) == set(COMMANDS)


def _flags(name: str) -> list:
    """(flag, action) for every option of the subcommand but --help."""
    out = []
    for action in SUBPARSERS[name]._actions:
        if not action.option_strings or "-h" in action.option_strings:
            continue
        for flag in action.option_strings:
            out.append((flag, action))
    return out


# ---- values -------------------------------------------------------------------------------------
JUNK = ["", " ", "-1", "-0", "0", "nan", "-nan", "inf", "-inf", "1e308", "-1e308", "1e-320", "abc", "none",
        "None", "1.5", "0x10", "99999999999999999999999", "-99999999999999999999999", "--", "-", "1,2",
        "1,,0", "random:2", "random:nan", "cuda", "cuda:7", "meta", "nonexistent/path", "ü", "\x00"]
SMALL_INTS = ["0", "1", "2", "3"]
FLOATS = ["0.5", "1", "1e-3", "0.1", "2", "20", "1e308", "1e-300", "5e-324", "0.999999"]
INT_TYPES = ("positive_int", "nonneg_int", "int")


def _values(action) -> st.SearchStrategy:
    """Values for one flag: plausible ones of its kind mixed with junk; integers only small or invalid."""
    kind = getattr(action.type, "__name__", None)
    if action.choices:
        good = st.sampled_from([str(c) for c in action.choices])
    elif kind in INT_TYPES:
        good = st.sampled_from(SMALL_INTS)
    elif kind in ("parse", "float"):
        good = st.sampled_from(FLOATS)
    else:
        good = st.sampled_from(["0", "1", "x", "1,1", "none", "16", "center", "left-half", "random:0.5"])
    junk = st.sampled_from([j for j in JUNK if not (kind in INT_TYPES and j.lstrip("0x").isdigit()
                                                  and not j.startswith("-") and int(j, 0) > 3)])
    return st.one_of(good, good, junk)  # mostly plausible, so that many examples reach the run


def _piece(name: str) -> st.SearchStrategy:
    """One piece of an argument list: a flag with a value, a flag alone (a missing value), or junk."""
    flags = _flags(name)

    def with_value(pair):
        flag, action = pair
        if action.nargs == 0:
            return st.just([flag])
        if action.nargs in ("+", "*"):
            return st.lists(_values(action), min_size=0, max_size=3).map(lambda vs: [flag, *vs])
        return _values(action).map(lambda v: [flag, v])

    return st.one_of(
        st.sampled_from(flags).flatmap(with_value),
        st.sampled_from(flags).flatmap(with_value),
        st.sampled_from(flags).map(lambda pair: [pair[0]]),
        st.sampled_from(["--no-such-flag", "-x", "stray", "--", "-1", "", "--steps=", "--lr=nan",
                         "--batch-size=-3"]).map(lambda t: [t]),
    )


def _random_args(name: str) -> st.SearchStrategy:
    return st.lists(_piece(name), min_size=0, max_size=4).map(lambda pieces: [t for p in pieces for t in p])


# ---- running ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run():
    """A CIFAR-shaped data folder and a 1-step checkpoint of a tiny U-Net (and of a class-conditional one
    beside it, in "cond"), made once."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_cifar_batches(Path(tmp) / "data")
        run = Path(tmp) / "run"
        with one_thread(), contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(train_args(root, run, 1, "--checkpoint-every", "1")) == 0
            # its class-conditional twin, for classify
            assert cli.main(train_args(root, run.parent / "cond", 1, "--checkpoint-every", "1",
                                       "--class-conditional")) == 0
        yield root, run


@pytest.fixture(scope="module", autouse=True)
def no_toy_figures():
    """The toy's figures take seconds each; the fuzz is about arguments, not matplotlib."""
    before = toy_app._draw
    toy_app._draw = lambda *args, **kwargs: None
    yield
    toy_app._draw = before


def _base(name: str, tmp: Path, root: Path, run: Path) -> list:
    if name == "swissroll":
        return ["swissroll", *SWISSROLL_TINY, "--out", str(tmp / "out")]
    if name == "train":
        return [*train_args(root, tmp / "out", 1), "--max-seconds", "20"]
    if name == "eval":
        return ["eval", "--checkpoint", str(run), "--dataset", "cifar10", "--data-root", str(root), "--n-slices", "1",
                "--batch-size", "4", "--limit", "2", "--no-progress", "--json", str(tmp / "eval.json")]
    if name == "classify":
        return ["classify", "--checkpoint", str(run.parent / "cond"), "--dataset", "cifar10", "--data-root", str(root), "--limit", "2",
                "--n-slices", "1", "--batch-size", "2"]
    if name == "classifier":
        return ["classifier", "--dataset", "cifar10", "--data-root", str(root), "--out", str(tmp / "c.pt"),
                "--steps", "1", "--batch-size", "4", "--no-progress"]
    if name == "fid":
        import numpy as np
        from sdeflow.metrics import ClassifierNet, save_classifier

        save_classifier(ClassifierNet(3, 32, width=4, feature_dim=8), tmp / "c.pt")
        np.savez(tmp / "s.npz", samples=np.full((6, 3, 32, 32), 100, np.uint8))
        return ["fid", "--samples", str(tmp / "s.npz"), "--dataset", "cifar10", "--data-root", str(root),
                "--features", "classifier", "--classifier", str(tmp / "c.pt"), "--kid-subsets", "2",
                "--kid-subset-size", "4", "--no-progress"]
    common = ["--checkpoint", str(run), "--out", str(tmp / "out.png"), "--n-steps", "2", "--n-samples", "1",
              "--no-progress"]
    if name == "sample":
        return ["sample", *common]
    images = ["--data-root", str(root), "--n-images", "1"]
    if name == "inpaint":
        return ["inpaint", *common, *images, "--mask", "center"]
    return ["denoise", *common, *images, "--snr", "10"]


def run_main(argv: list) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process without stdin; (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as stop:
                code = stop.code
                status = 0 if code is None else code if isinstance(code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return status, out.getvalue(), err.getvalue()


def check_promise(argv: list, status: int, stderr: str) -> None:
    where = f"argv={argv!r}\nstderr={stderr!r}"
    assert status in (0, 1, 2), where
    assert "Traceback" not in stderr, where
    if status != 0:
        assert stderr.endswith("\n") and stderr.count("\n") == 1 and stderr.strip(), where


@pytest.mark.parametrize("name", COMMANDS)
def test_random_arguments_end_in_0_1_or_2_with_one_line(name, tiny_run):
    root, run = tiny_run

    @settings(max_examples=35 if name in ("swissroll", "train") else 40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(args=_random_args(name))
    def fuzz(args):
        with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), one_thread():
            argv = [*_base(name, Path(tmp), root, run), *args]
            status, _, stderr = run_main(argv)
            check_promise(argv, status, stderr)

    fuzz()


@pytest.mark.parametrize("name", COMMANDS)
def test_the_base_settings_run_through(name, tiny_run, tmp_path):
    """The fuzz starts from settings that work, so random arguments reach the run itself."""
    root, run = tiny_run
    with contextlib.chdir(tmp_path), one_thread():
        status, stdout, stderr = run_main(_base(name, tmp_path, root, run))
    assert status == 0, stderr
    assert stdout.strip()


def test_a_huge_learning_rate_ends_in_one_line_not_a_traceback(tmp_path):
    # It used to end in a FloatingPointError traceback.
    argv = ["swissroll", *SWISSROLL_TINY, "--steps", "3", "--lr", "1e8", "--out", str(tmp_path / "out")]
    with one_thread():
        status, _, stderr = run_main(argv)
    assert status in (0, 1), stderr
    check_promise(argv, status, stderr)
