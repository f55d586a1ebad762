"""Data-parallel training and evaluation: 2 CPU processes with the gloo backend."""

import pytest
import torch
import torch.multiprocessing as mp

from sdeflow import checkpoint as ckpt
from sdeflow import training

from training_helpers import (distributed_worker, single_thread, tiny_config, tiny_images, tiny_model,
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
    result = training.train(tiny_model(config), tiny_images(), run,
                            tiny_train_config(steps=5, checkpoint_every=5, batch_size=4), config, resume=True)
    assert result["step"] == 5
    assert ckpt.load_checkpoint(run / "ckpt-00000005.pt")["trainer"]["world_size"] == 1


def test_sharded_evaluation_gathers_the_single_process_answer(two_ranks):
    run, (rank0, rank1) = two_ranks
    assert rank0["n_images"] == rank1["n_images"] == 8
    assert torch.equal(rank0["bpd_per_image"], rank1["bpd_per_image"])
    model = tiny_model(tiny_config())
    model.load_state_dict(rank0["params"])
    single = training.evaluate_bpd(model, tiny_images(8), tiny_config(), batch_size=2, seed=4)
    assert torch.equal(single["bpd_per_image"], rank0["bpd_per_image"])
