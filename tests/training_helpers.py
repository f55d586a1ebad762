"""Tiny models, images and data files for the training, CLI, distributed and fault tests."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sdeflow.config import build_model
from sdeflow.training import TrainConfig
from sdeflow.engine import Hook
from sdeflow.likelihood.evaluation import evaluate_bpd
from sdeflow.experiments import images as images_app
from sdeflow.experiments.images import image_model_config


REPO = Path(__file__).resolve().parents[1]

# A U-Net small enough that a step on 8×8 images takes milliseconds.
TINY_NET = dict(base_channels=4, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
# The same for 32×32 CIFAR-shaped images, as passed on the command line.
TINY_CLI_NET = ["--base-channels", "4", "--channel-mult", "1,1,1", "--num-res-blocks", "1",
                "--attn-resolutions", "none", "--dropout", "0"]


@contextlib.contextmanager
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin against the other
    processes and make tiny networks tens of times slower; one thread also gives the same reduction
    order as the child processes (OMP_NUM_THREADS=1), which bit-exact comparisons need."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    with one_thread():
        yield


def tiny_config(**kwargs) -> dict:
    kwargs.setdefault("in_channels", 1)
    kwargs.setdefault("image_size", 8)
    return image_model_config("toy", "small", net_overrides=TINY_NET, **kwargs)


def tiny_model(config: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config or tiny_config())


def tiny_images(n: int = 24, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Smooth-ish images: a random gradient plus noise, so the model has something to learn.
    ramp = torch.linspace(0, 1, size)
    base = (ramp[None, None, :, None] * torch.rand(n, channels, 1, 1, generator=gen) * 200)
    noise = torch.rand(n, channels, size, size, generator=gen) * 55
    return (base + noise).clamp(0, 255).to(torch.uint8).expand(n, channels, size, size).contiguous()


class OnRecord(Hook):
    """A logging hook that hands every record to ``fn`` (as a user's own hook would)."""

    def __init__(self, fn):
        self.fn = fn

    def on_record(self, trainer, record):
        self.fn(record)


def tiny_train_config(**kwargs) -> TrainConfig:
    defaults = dict(steps=4, batch_size=4, checkpoint_every=2, log_every=1, seed=1)
    defaults.update(kwargs)
    return TrainConfig(**defaults)


def write_cifar_batches(root: Path, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder with one small training batch and a test batch, written the way the
    official files are (protocol-2 pickles with byte-string keys)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in [("data_batch_1", n_train), ("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(), b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"labels": [0] * 4, b"data": data}, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, handle, protocol=2)
    return Path(root)


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdeflow", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=kwargs.pop("cwd", REPO), **kwargs)


def train_args(data_root, out, steps=4, *extra) -> list:
    args = ["train", "--dataset", "cifar10", "--data-root", data_root, "--steps", steps, "--batch-size", 4,
            "--out", out, "--checkpoint-every", 2, "--log-every", 1, "--no-progress", "--seed", 3,
            *TINY_CLI_NET, *extra]
    return [str(a) for a in args]


def distributed_worker(rank: int, world: int, init_file: str, run_dir: str, out_dir: str) -> None:
    """One rank of tests/test_distributed.py: a few training steps and an evaluation under gloo."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = tiny_config()
        report = {}
        try:
            images_app.train_images(tiny_model(config), tiny_images(), run_dir, tiny_train_config(batch_size=5), config)
        except ValueError as err:
            report["indivisible"] = str(err)
        model = tiny_model(config)
        result = images_app.train_images(model, tiny_images(), run_dir,
                                tiny_train_config(steps=3, checkpoint_every=3, batch_size=4), config)
        report["step"] = result["step"]
        evaluation = evaluate_bpd(model, tiny_images(8), config, batch_size=2, seed=4)
        report["bpd_per_image"] = evaluation["bpd_per_image"]
        report["n_images"] = evaluation["n_images"]
        report["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(report, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def toy_distributed_worker(rank: int, world: int, init_file: str, run_dir: str, out_dir: str) -> None:
    """One rank of the toy example trained data-parallel (gloo): the same loop as the images."""
    import torch.distributed as dist

    from sdeflow.experiments.toy import ToyConfig, make_toy_model, toy_train_config, train_toy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = ToyConfig(net={**ToyConfig().net, "hidden": 8},
                           train=toy_train_config(steps=3, batch_size=16, monitor_every=2, monitor_batch=8,
                                                  checkpoint_every=3, seed=2))
        torch.manual_seed(0)
        _, history, result = train_toy(make_toy_model(config), config, run_dir)
        params = {k: v.detach().clone() for k, v in result["ema_model"].state_dict().items()}
        torch.save({"step": result["step"], "params": params, "history": history}, f"{out_dir}/toy{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
