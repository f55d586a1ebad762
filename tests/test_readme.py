"""The README's "library in ten lines" runs as written, on a small network and data it defines."""

import re
from pathlib import Path

import torch

import sdeflow
from sdeflow.nets.mlp import MLP

README = Path(__file__).resolve().parents[1] / "README.md"


def _ten_lines() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The library in ten lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_in_ten_lines_runs_as_written():
    torch.manual_seed(0)
    namespace = {"net": MLP(dim=2, hidden=32, n_blocks=1), "x": torch.randn(64, 2),
                 "mask": torch.tensor([[1.0, 0.0]]).expand(64, 2)}
    exec(compile(_ten_lines(), str(README), "exec"), namespace)
    assert namespace["loss"].ndim == 0 and torch.isfinite(namespace["loss"])
    assert namespace["elbo"].shape == (64,) and namespace["logp"].shape == (64,)
    assert namespace["info"]["nfe"] > 0
    assert namespace["samples"].shape == (64, 2) and namespace["filled"].shape == (64, 2)
    assert namespace["trace"].nfe == 10 * sdeflow.METHODS["dpm3"].nfe()
    torch.testing.assert_close(namespace["filled"][:, 0], namespace["x"][:, 0])  # observed entries kept
