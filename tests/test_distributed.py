"""Data-parallel training and evaluation: 2 CPU processes with the gloo backend."""

import pytest
import torch
import torch.multiprocessing as mp

from sdeflow.storage import checkpoints as ckpt
from sdeflow.likelihood.evaluation import evaluate_bpd
from sdeflow.experiments import images as images_app

from training_helpers import (distributed_worker, single_thread, toy_distributed_worker, tiny_config, tiny_images, tiny_model,
                              tiny_train_config)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    run = base / "run"
    mp.spawn(distributed_worker, args=(2, str(base / "init"), str(run), str(base)), nprocs=2, join=True)
    return run, [torch.load(base / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ranks_stay_in_sync(two_ranks):
    _, (rank0, rank1) = two_ranks
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["params"].keys() == rank1["params"].keys()
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    # Training moved the weights (the check above is not about two untouched copies).
    fresh = tiny_model(tiny_config()).state_dict()
    assert any(not torch.equal(fresh[n], rank0["params"][n]) for n in fresh)


def test_batch_size_must_divide_across_ranks(two_ranks):
    _, (rank0, rank1) = two_ranks
    for report in (rank0, rank1):
        assert report["indivisible"] == "batch_size 5 does not divide across 2 processes; use a multiple of 2"


def test_checkpoint_holds_every_rank_rng_and_resumes_on_one_process(two_ranks, tmp_path):
    run, (rank0, _) = two_ranks
    state = ckpt.load_checkpoint(run / "ckpt-00000003.pt")
    assert state["trainer"]["world_size"] == 2 and len(state["trainer"]["rng"]) == 2
    for name, value in state["model"].items():
        assert torch.equal(value, rank0["params"][name])
    config = tiny_config()
    result = images_app.train_images(tiny_model(config), tiny_images(), run,
                            tiny_train_config(steps=5, checkpoint_every=5, batch_size=4), config, resume=True)
    assert result["step"] == 5
    assert ckpt.load_checkpoint(run / "ckpt-00000005.pt")["trainer"]["world_size"] == 1


def test_sharded_evaluation_gathers_the_single_process_answer(two_ranks):
    run, (rank0, rank1) = two_ranks
    assert rank0["n_images"] == rank1["n_images"] == 8
    assert torch.equal(rank0["bpd_per_image"], rank1["bpd_per_image"])
    model = tiny_model(tiny_config())
    model.load_state_dict(rank0["params"])
    single = evaluate_bpd(model, tiny_images(8), tiny_config(), batch_size=2, seed=4)
    assert torch.equal(single["bpd_per_image"], rank0["bpd_per_image"])


@pytest.mark.slow
def test_torchrun_cli_two_processes_then_resume_on_one(tmp_path):
    """The documented command under torchrun (2 CPU processes, gloo), then --resume without it."""
    import subprocess
    import sys

    from training_helpers import cli_env, train_args, write_cifar_batches

    root = write_cifar_batches(tmp_path / "data")
    run = tmp_path / "run"
    args = train_args(root, run, 2)[1:]
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "sdeflow", "train", *args],
                              capture_output=True, text=True, timeout=180, env=cli_env())
    assert launched.returncode == 0, launched.stderr[-2000:]
    state = ckpt.load_checkpoint(run / "ckpt-00000002.pt")
    assert state["trainer"]["world_size"] == 2
    resumed = subprocess.run([sys.executable, "-m", "sdeflow", "train", *train_args(root, run, 4, "--resume")[1:]],
                             capture_output=True, text=True, timeout=300, env=cli_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ckpt.load_checkpoint(run / "ckpt-00000004.pt")["step"] == 4


def test_the_toy_trains_data_parallel_on_the_same_loop(tmp_path):
    mp.spawn(toy_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "run"), str(tmp_path)),
             nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"toy{r}.pt", weights_only=True) for r in range(2))
    assert rank0["step"] == rank1["step"] == 3
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    assert rank0["history"]["elbo_step"] == [2, 3]  # the ELBO monitor ran (on every rank, logged by rank 0)
    state = ckpt.load_checkpoint(tmp_path / "run" / "ckpt-00000003.pt")
    assert state["trainer"]["world_size"] == 2 and state["config"]["net"]["name"] == "mlp"
