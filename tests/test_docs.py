"""The README and the pages under docs/ say what the code does: every ```python block runs as written
(on small networks and data its test defines), every `sdeflow` command line of a ```bash block is accepted
by the command line's own parser, every relative link points to a file, and the README stays short."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from training_helpers import one_thread

import sdeflow
from sdeflow import cli
from sdeflow.nets.mlp import MLP

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250
# .ci/run runs this line verbatim: the Quickstart must keep it as it is.
TEST_COMMAND = 'pip install -q -e ".[test]" && python -m pytest -q'

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


# ---- what the prose around a page's python blocks assumes, per page ------------------------------------
def _readme_namespace(tmp_path) -> dict:
    """The ten lines' `net`, `x` and `mask`: a small MLP on 2-D data, the first coordinate observed."""
    return {"net": MLP(dim=2, hidden=32, n_blocks=1), "x": torch.randn(64, 2),
            "mask": torch.tensor([[1.0, 0.0]]).expand(64, 2)}


def _discrete_bound_namespace(tmp_path) -> dict:
    """An image `model` whose U-Net has a variance head (`sdeflow train --learned-variance`), narrowed so a
    step takes milliseconds, and uint8 `images` (B, 3, 32, 32)."""
    from sdeflow.experiments.images import image_model_config

    config = image_model_config("cifar10", "small", net_overrides=dict(
        base_channels=4, channel_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
        learned_variance=True))
    return {"sdeflow": sdeflow, "model": sdeflow.build_model(config).eval(),
            "images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)}


def _foreign_models_namespace(tmp_path) -> dict:
    """`DIR`: a tiny diffusers UNet2DModel and its DDPMScheduler saved by save_pretrained (no download);
    `net` a discrete-time network net(x, n), `denoiser` a D(x; σ), `sde` an sdeflow SDE."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path / "DIR")
    return {"sdeflow": sdeflow, "net": unet, "denoiser": lambda x, sigma: x, "sde": sdeflow.VPSDE()}


NAMESPACES = {"README.md": _readme_namespace, "docs/discrete-bound.md": _discrete_bound_namespace,
              "docs/foreign-models.md": _foreign_models_namespace}

PYTHON_BLOCKS = [(_name(page), index) for page in PAGES for index in range(len(_blocks(page, "python")))]


@pytest.mark.parametrize("page,index", PYTHON_BLOCKS, ids=[f"{p}#{i}" for p, i in PYTHON_BLOCKS])
def test_every_python_block_runs_as_written(page, index, tmp_path, monkeypatch):
    """Run in an empty folder (what a block writes, e.g. runs/moons, lands there), one thread, seeded."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = NAMESPACES.get(page, lambda _: {})(tmp_path)
    source = _blocks(ROOT / page, "python")[index]
    with one_thread():
        exec(compile(source, f"{page} (python block {index})", "exec"), namespace)


# ---- the ten lines, with what they promise -----------------------------------------------------------
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


# ---- command lines -----------------------------------------------------------------------------------
def _command_lines() -> list[tuple[str, str, list[str]]]:
    """(page, the line as written, the sdeflow arguments) of every `sdeflow ...` command in a bash block:
    continuation lines joined, comments dropped, `a && b` split; under torchrun, what follows
    `-m sdeflow`."""
    found = []
    for page in PAGES:
        for block in _blocks(page, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                commands, current = [], []
                for word in words:
                    if word in ("&&", "||", ";", "|"):
                        commands.append(current)
                        current = []
                    else:
                        current.append(word)
                commands.append(current)
                for command in commands:
                    if command[:1] == ["sdeflow"]:
                        found.append((_name(page), line.strip(), command[1:]))
                    elif command[:1] == ["torchrun"] and "sdeflow" in command:
                        at = command.index("sdeflow")
                        if command[at - 1] == "-m":
                            found.append((_name(page), line.strip(), command[at + 1:]))
    return found


COMMAND_LINES = _command_lines()


def test_the_pages_hold_command_lines_to_check():
    assert len(COMMAND_LINES) >= 40
    assert {page for page, _, _ in COMMAND_LINES} >= {"README.md", "docs/cli.md", "docs/samples.md"}


@pytest.mark.parametrize("page,line,arguments", COMMAND_LINES,
                         ids=[f"{p}:{' '.join(a[:1])}:{i}" for i, (p, _, a) in enumerate(COMMAND_LINES)])
def test_every_command_line_parses(page, line, arguments, capsys, monkeypatch):
    """Parsed as on a machine with a GPU: `--device cuda` is checked against the machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        cli.build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"{page}: `{line}` is not a valid sdeflow command: {capsys.readouterr().err.strip()}")


# ---- the README's length, its test command, and every relative link ----------------------------------
def test_the_readme_is_short_and_keeps_the_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert TEST_COMMAND in text.splitlines()
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert TEST_COMMAND in ci.read_text(encoding="utf-8").splitlines()


_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return _LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[_name(p) for p in PAGES])
def test_every_relative_link_points_to_a_file(page):
    targets = [t for t in _links(page) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{_name(page)} links to missing files: {missing}"


def test_the_docs_are_linked_from_the_readme():
    linked = {(README.parent / t).resolve() for t in _links(README)}
    assert {page.resolve() for page in PAGES[1:]} <= linked
