"""Training and ELBO throughput of the DDPM U-Net (:mod:`sdeflow.nets.unet`) against a
straightforward implementation of the same network, measured in the same run.

For each preset it times, on the current device,

- a training step: ``PluginReverseSDE(VPSDE(), net).dsm(x).mean()`` (drift parameterization,
  uniform time), backward, Adam step;
- an ELBO evaluation: ``sdeflow.elbo(model, x, time_sampling="importance")`` under ``torch.no_grad()``
  (one network forward and one vector-Jacobian product for Hutchinson's trace), network in
  eval mode;

for the library U-Net (fused SiLU, one q/k/v projection, ``scaled_dot_product_attention``, with
optional channels-last, ``torch.compile`` and, on GPU, bf16 autocast) and for the baseline below
(explicit softmax(QKᵀ)V attention, separate q/k/v 1×1 convolutions, sigmoid(x)·x, float32, NCHW,
eager), which carries the library network's very weights, so that both compute the same function
(checked at start-up). Repeats of the two are interleaved, so that load from other processes on a
shared machine hits both alike; figures are medians, ratios are of medians.

    python benchmarks/throughput.py --presets small cifar10 --batch-size 32 --repeats 7

On a CPU with native bf16 (AVX512-BF16 or AMX; ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``)
training is also timed for our net under ``torch.autocast("cpu", torch.bfloat16)``, what
``sdeflow train --precision bf16`` runs (fp32 stays the default).

With ``--checkpoint RUN/ckpt-….pt --data-root DIR`` it also times the ELBO of that trained model
on real CIFAR-10 images the way ``sdeflow eval`` runs it by default (the fitted time proposal,
whose bins use the divergence-free denoising form wherever it is quieter: only those examples
need a vector-Jacobian product), against the baseline network with q ∝ g²/v and Hutchinson's
trace everywhere, and prints each estimate (in bits/dim of the model's input, before the
transform's log-determinant) so that one sees they estimate the same bound; their variances are
compared in ``estimators.py`` and ``cifar_budget.py``.
On an untrained network (zero output layer) the fit would be meaningless, hence a checkpoint.

On a CPU shared with other jobs pass ``--threads 1``: two OpenMP threads on two busy cores
spin against each other and make every figure several times slower and far noisier.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import sdeflow
import torch.nn.functional as F
from torch import nn

from sdeflow import VPSDE, PluginReverseSDE
from sdeflow.nets.unet import UNet, make_unet


# ---- the straightforward baseline: same architecture, textbook operations -----------------------
def swish(x):
    return torch.sigmoid(x) * x


class BaselineResBlock(nn.Module):
    def __init__(self, ref):
        super().__init__()
        in_ch, out_ch = ref.conv1.in_channels, ref.conv1.out_channels
        self.norm1 = nn.GroupNorm(ref.norm1.num_groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(ref.temb_proj.in_features, out_ch)
        self.norm2 = nn.GroupNorm(ref.norm2.num_groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(ref.dropout.p)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.skip(x) + h


class BaselineAttention(nn.Module):
    def __init__(self, ref):
        super().__init__()
        C = ref.proj_out.in_features
        self.norm = nn.GroupNorm(ref.norm.num_groups, C, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(C, C, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(C, C, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, C, H * W)
        k = self.k(h).view(B, C, H * W)
        v = self.v(h).view(B, C, H * W)
        attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * C ** -0.5, dim=-1)  # (B, HW, HW)
        h = torch.bmm(v, attn.permute(0, 2, 1)).view(B, C, H, W)
        return x + self.proj_out(h)


class BaselineBlock(nn.Module):
    def __init__(self, ref):
        super().__init__()
        self.res = BaselineResBlock(ref.res)
        self.attn = BaselineAttention(ref.attn) if ref.attn is not None else None

    def forward(self, x, temb):
        h = self.res(x, temb)
        return self.attn(h) if self.attn is not None else h


class BaselineUNet(nn.Module):
    """The U-Net of ``ref`` (a :class:`UNet`) written plainly, with ``ref``'s weights."""

    def __init__(self, ref: UNet):
        super().__init__()
        self.base_channels, self.time_scale = ref.base_channels, ref.time_scale
        lin1, lin2 = ref.time_embed[0], ref.time_embed[2]
        self.temb1 = nn.Linear(lin1.in_features, lin1.out_features)
        self.temb2 = nn.Linear(lin2.in_features, lin2.out_features)
        self.conv_in = nn.Conv2d(ref.conv_in.in_channels, ref.conv_in.out_channels, 3, padding=1)

        def mirror(module):
            if type(module).__name__ == "ResAttnBlock":
                return BaselineBlock(module)
            C = module.conv.in_channels
            conv = nn.Conv2d(C, C, 3, stride=module.conv.stride, padding=1)
            return ("down" if module.conv.stride[0] == 2 else "up", conv)

        self.down, self.up, self.kinds_down, self.kinds_up = nn.ModuleList(), nn.ModuleList(), [], []
        for src, dst, kinds in ((ref.down, self.down, self.kinds_down), (ref.up, self.up, self.kinds_up)):
            for module in src:
                m = mirror(module)
                kinds.append("block" if isinstance(m, nn.Module) else m[0])
                dst.append(m if isinstance(m, nn.Module) else m[1])
        self.mid = nn.ModuleList([BaselineBlock(b) for b in ref.mid])
        self.norm_out = nn.GroupNorm(ref.norm_out.num_groups, ref.norm_out.num_channels, eps=1e-6)
        self.conv_out = nn.Conv2d(ref.conv_out.in_channels, ref.conv_out.out_channels, 3, padding=1)
        self.copy_weights(ref)

    @torch.no_grad()
    def copy_weights(self, ref: UNet):
        own = self.state_dict()
        mapped = {}
        for key, value in ref.state_dict().items():
            key = key.replace("time_embed.0", "temb1").replace("time_embed.2", "temb2").replace(".conv.", ".")
            if ".attn.qkv." in key:
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    new = key.replace(".qkv.", f".{name}.")
                    mapped[new] = part.reshape(own[new].shape)
            elif ".attn.proj_out." in key:
                mapped[key] = value.reshape(own[key].shape)
            else:
                mapped[key] = value
        self.load_state_dict(mapped)

    def forward(self, x, t):
        half = self.base_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
        angles = (t * self.time_scale)[:, None] * freqs[None, :]
        temb = self.temb2(swish(self.temb1(torch.cat([angles.sin(), angles.cos()], dim=1))))
        hs = [self.conv_in(x)]
        for kind, module in zip(self.kinds_down, self.down):
            if kind == "block":
                hs.append(module(hs[-1], temb))
            else:
                hs.append(module(hs[-1]))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for kind, module in zip(self.kinds_up, self.up):
            if kind == "block":
                h = module(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = module(F.interpolate(h, scale_factor=2, mode="nearest"))
        assert not hs
        return self.conv_out(swish(self.norm_out(h)))


# ---- timing ---------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Candidate:
    """One network with its optimizer, autocast context and step functions."""

    def __init__(self, name, net, device, batch_size, autocast_dtype=None, compile_net=False, seed=0):
        self.name, self.device = name, device
        self.model = PluginReverseSDE(VPSDE(), net, parameterization="drift").to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        if compile_net:
            net.compile_blocks()
        self.autocast = ((lambda: torch.autocast(device.type, dtype=autocast_dtype))
                         if autocast_dtype is not None else nullcontext)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.x = torch.randn((batch_size, 3, 32, 32), generator=g).to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def train_step(self):
        self.model.train()
        with self.autocast():
            loss = sdeflow.dsm(self.model, self.x, generator=self.generator).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(self.device)

    def elbo_batch(self):
        # As an evaluation runs (e.g. on EMA weights): eval mode, no parameter gradients.
        self.model.eval()
        self.model.requires_grad_(False)
        with torch.no_grad(), self.autocast():
            sdeflow.elbo(self.model, self.x, time_sampling="importance", generator=self.generator)
        sync(self.device)
        self.model.requires_grad_(True)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory_mb(fn, device):
    """Peak allocated memory of one call in MiB on CUDA; None on CPU, where the allocator keeps
    no peak (the process's peak RSS is printed at the end instead)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def bench_preset(preset, args, device, out):
    torch.manual_seed(0)
    net = make_unet(preset, in_channels=3, image_size=32)
    n_params = sum(p.numel() for p in net.parameters())
    baseline_net = BaselineUNet(net)
    # Same function? Compare in eval mode on random weights (the zero final conv would hide errors).
    check_net = make_unet(preset, in_channels=3, image_size=32)
    for p in check_net.conv_out.parameters():
        nn.init.normal_(p, std=0.05)
    check_base = BaselineUNet(check_net).eval()
    check_net.eval()
    with torch.no_grad():
        y, t = torch.randn(2, 3, 32, 32), torch.rand(2)
        diff = (check_net(y, t) - check_base(y, t)).abs().max().item()
    out(f"\n== preset {preset}: {n_params / 1e6:.3f} M parameters, batch {args.batch_size}, {device} "
        f"({torch.get_num_threads()} threads); baseline matches the library net to {diff:.1e}")
    if diff > 1e-4:
        raise RuntimeError(f"baseline and library U-Net disagree by {diff}")

    ours_net = make_unet(preset, in_channels=3, image_size=32)
    ours_net.load_state_dict(net.state_dict())
    if args.channels_last:
        ours_net = ours_net.to(memory_format=torch.channels_last)
    autocast = torch.bfloat16 if (device.type == "cuda" and not args.no_bf16) else None
    ours = Candidate("ours", ours_net, device, args.batch_size, autocast, args.compile)
    base = Candidate("baseline", baseline_net, device, args.batch_size)
    base.x = ours.x.clone()
    extra = None  # our net under CPU bf16 autocast, timed for training only
    if device.type == "cpu" and not args.no_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16_net = make_unet(preset, in_channels=3, image_size=32)
        bf16_net.load_state_dict(net.state_dict())
        extra = Candidate("ours-bf16", bf16_net, device, args.batch_size, torch.bfloat16)
        extra.x = ours.x.clone()
    options = (f"SDPA, fused SiLU/qkv{', channels-last' if args.channels_last else ''}"
               f"{', torch.compile (per block)' if args.compile else ''}{', bf16 autocast' if autocast else ', fp32'}")
    out(f"   ours: {options}; baseline: explicit softmax attention, fp32, NCHW, eager")

    repeats = args.repeats if preset == "small" else max(3, args.repeats // 2)
    results = {}
    for task, batch_items in (("train", 1), ("elbo", args.batch_size)):
        cands = (ours, base) + ((extra,) if extra is not None and task == "train" else ())
        times = {c.name: [] for c in cands}
        for cand in cands:  # warm-up (and compilation) outside the timing
            fn = cand.train_step if task == "train" else cand.elbo_batch
            warm = timed(fn)
            for _ in range(args.warmup - 1):
                warm += timed(fn)
            if cand is ours and args.compile:
                out(f"   {task}: warm-up incl. compilation {warm:.1f} s")
        for _ in range(repeats):
            for cand in cands:
                times[cand.name].append(timed(cand.train_step if task == "train" else cand.elbo_batch))
        memory = {c.name: peak_memory_mb(c.train_step if task == "train" else c.elbo_batch, device)
                  for c in cands}
        mem_text = lambda mb: "" if mb is None else f"; peak memory {mb:.0f} MiB"
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: batch_items / v for k, v in med.items()}
        unit = "steps/s" if task == "train" else "images/s"
        label = "training" if task == "train" else "ELBO    "
        for name, observed in times.items():
            spread = f"[{min(observed):.3f}–{max(observed):.3f}]"
            out(f"   {label} {name:9s}: {rate[name]:8.3f} {unit:8s} (median {med[name]:.3f} s/batch "
                f"{spread} over {repeats}{mem_text(memory[name])})")
        out(f"   {label} speed-up ours / baseline: {rate['ours'] / rate['baseline']:.2f}x")
        results[task] = rate["ours"] / rate["baseline"]
        if "ours-bf16" in rate:
            out(f"   {label} speed-up ours under bf16 autocast / baseline (fp32): "
                f"{rate['ours-bf16'] / rate['baseline']:.2f}x")
            results["train-bf16"] = rate["ours-bf16"] / rate["baseline"]
    return results


def bench_checkpoint(args, device, out):
    """The default ELBO of a trained model (fitted proposal) against the baseline network's
    Hutchinson ELBO with q ∝ g²/v, on held-out real images; speed and per-image spread."""
    from sdeflow.data.images import load_cifar10
    from sdeflow.storage.checkpoints import load_model
    from sdeflow.data.transforms import preprocess

    model, config, step = load_model(args.checkpoint, device=device)
    model.requires_grad_(False)
    baseline = PluginReverseSDE(model.sde, BaselineUNet(model.net), parameterization=model.parameterization)
    baseline = baseline.to(device).eval().requires_grad_(False)
    images = load_cifar10(args.data_root, "train")[-(args.batches + 1) * args.batch_size:]
    gen = torch.Generator().manual_seed(0)
    ys = [preprocess(images[i:i + args.batch_size], config["data"], gen).y.to(device)
          for i in range(0, images.shape[0], args.batch_size)]
    pilot, batches = ys[0], ys[1:]
    out(f"\n== trained checkpoint {args.checkpoint} (step {step}, {model.parameterization} network), "
        f"{len(batches)} batches of {args.batch_size} real images, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    with torch.no_grad():
        proposal = sdeflow.fit_time_proposal(model, pilot, generator=torch.Generator(device).manual_seed(1))
    out(f"   fitting the proposal (once per model): {time.perf_counter() - start:.1f} s; every draw uses the "
        f"divergence-free denoising form, control-variate coefficients {float(proposal.control.min()):.2f} "
        f"to {float(proposal.control.max()):.2f} across its {len(proposal.proposal.probs)} bins")
    runs = {"ours, default (fitted)": (model, proposal), "ours, q ∝ g²/v": (model, "importance"),
            "baseline, q ∝ g²/v": (baseline, "importance")}
    times = {k: [] for k in runs}
    values = {k: [] for k in runs}
    generator = torch.Generator(device).manual_seed(2)
    for m, ts in runs.values():  # warm-up
        with torch.no_grad():
            sdeflow.elbo(m, batches[0], time_sampling=ts, generator=generator)
    for _ in range(args.repeats):
        for y in batches:
            for name, (m, ts) in runs.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    elbo = sdeflow.elbo(m, y, time_sampling=ts, generator=generator)
                    sync(device)
                    times[name].append(time.perf_counter() - start)
                values[name].append(elbo / y[0].numel() / math.log(2))
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    for name in runs:
        bits = -torch.cat(values[name]).double()  # −ELBO per dimension of y, in bits
        out(f"   ELBO {name:24s}: {rate[name]:7.1f} images/s; −ELBO {bits.mean():.2f} ± "
            f"{bits.std().item() / math.sqrt(bits.numel()):.2f} bits/dim of y")
    ratio = rate["ours, default (fitted)"] / rate["baseline, q ∝ g²/v"]
    out(f"   ELBO speed-up ours (default estimator) / baseline: {ratio:.2f}x")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "cifar10"], help="U-Net presets to time")
    parser.add_argument("--batch-size", type=int, default=32, help="images per training step / ELBO batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per candidate (halved for cifar10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="run our net channels-last (default: on GPU only; slower on the 2-core CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks of our net (UNet.compile_blocks; compile time reported)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="keep fp32 on GPU, and skip the bf16 training row on a CPU with native bf16")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint: also time its default ELBO on real images")
    parser.add_argument("--data-root", default=None, help="CIFAR-10 root for --checkpoint")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches per repeat for --checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if (args.checkpoint is None) != (args.data_root is None):
        parser.error("--checkpoint and --data-root go together")
    ratios = {}
    for preset in args.presets:
        ratios[preset] = bench_preset(preset, args, device, out=lambda s: print(s, flush=True))
    trained = bench_checkpoint(args, device, out=lambda s: print(s, flush=True)) if args.checkpoint else None
    print("\nsummary (ours / baseline, medians):")
    for preset, r in ratios.items():
        bf16 = f"   training under bf16 autocast {r['train-bf16']:.2f}x" if "train-bf16" in r else ""
        print(f"   {preset:8s} training {r['train']:.2f}x   ELBO {r['elbo']:.2f}x{bf16}")
    if trained is not None:
        print(f"   trained checkpoint: default ELBO estimator {trained:.2f}x the baseline's")
    if device.type == "cpu":
        import resource
        print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
