r"""The DDPM U-Net of Ho, Jain & Abbeel (2020), as a drift / score / noise network ``net(y, t)``.

Architecture (their Appendix B, the 32×32 CIFAR-10 model): a 3×3 input convolution; per
resolution level ``num_res_blocks`` residual blocks (GroupNorm → SiLU → conv, plus a learned
projection of the time embedding, GroupNorm → SiLU → dropout → conv, and a skip), self-attention
after every residual block at the resolutions in ``attn_resolutions``, and a strided-convolution
downsampling between levels; a middle of residual block → attention → residual block; the mirror
image going up with ``num_res_blocks + 1`` blocks per level, each fed the concatenation of the
current features and one stored skip activation, and nearest-neighbour ×2 upsampling followed by a
3×3 convolution; finally GroupNorm → SiLU → a 3×3 convolution initialised to zero, so that the
untrained network outputs 0 (the drift of a pure-noise model).

Time: ``t`` has shape (B,) and is continuous in [0, T]; the sinusoidal embedding (Vaswani et
al. 2017, as in DDPM) is taken of ``t · time_scale`` (default 1000), which puts the continuous time
on the scale of DDPM's 1000 discrete steps, so the embedding's frequencies resolve it.

Speed: attention uses :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels,
no materialised softmax when a flash kernel applies) on tokens obtained from the feature map by a
free view when it is stored channels-last; every op here keeps channels-last layout, so
``net.to(memory_format=torch.channels_last)`` runs the whole network in NHWC (the input is
converted on entry). See ``benchmarks/throughput.py`` for the measured effect of each option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import check_choice, check_decay, check_nonneg_int, check_positive_int
from .classes import ClassEmbedding, check_labels

__all__ = ["UNet", "PRESETS", "DEFAULT_PRESET", "make_unet", "sinusoidal_embedding"]

PRESETS: dict[str, dict] = {
    # Ho et al.'s CIFAR-10 model (35.7 M parameters).
    "cifar10": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1),
    # 28×28 → 14 → 7: attention at 14, the level that corresponds to 16 on 32×32 images.
    "mnist": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(14,), dropout=0.1),
    # sdeflow-light's U-Net for CPU runs (≈1.6 M parameters at 32×32×3).
    "small": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                  attn_resolutions=(16,), dropout=0.1),
    # "small" without self-attention at 16×16 (the middle block keeps its own) and without dropout:
    # faster per step on a 2-core CPU and better bits/dim in a fixed time budget, chosen on a
    # validation split (README, the ablation: attention −0.105, dropout −0.078 bits/dim). The
    # default of ``sdeflow train``.
    "cpu": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                attn_resolutions=(), dropout=0.0),
}
#: The preset ``sdeflow train`` and :func:`sdeflow.experiments.images.image_model_config` use by default.
DEFAULT_PRESET = "cpu"


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with DDPM's 32 groups, or fewer so that every group has at least 2 channels
    (the largest divisor of ``channels`` that is ≤ 32 and ≤ channels/2).

    Why at least 2: a group of one channel subtracts that channel's spatial mean, which erases the
    per-channel shift by which a residual block adds the time embedding, so narrow levels
    (sdeflow-light's 32-channel level of the ``small`` net) would ignore t. The parameter count
    does not depend on the number of groups.
    """
    limit = max(1, min(max_groups, channels // 2))
    groups = max(d for d in range(1, limit + 1) if channels % d == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's initialiser: U(−b, b) with b = √(3·scale / fan_avg), fan_avg = (fan_in + fan_out)/2.
    ``scale = 0`` gives exact zeros."""
    receptive = weight[0][0].numel() if weight.ndim > 2 else 1
    fan_avg = 0.5 * (weight.shape[0] + weight.shape[1]) * receptive
    bound = math.sqrt(3.0 * scale / max(1.0, fan_avg))
    with torch.no_grad():
        return weight.uniform_(-bound, bound) if bound > 0 else weight.zero_()


def _conv(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2)
    variance_scaling_(conv.weight, scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    lin = nn.Linear(in_features, out_features)
    variance_scaling_(lin.weight, scale)
    nn.init.zeros_(lin.bias)
    return lin


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Transformer-style embedding of (B,) times into (B, dim):
    :math:`[\sin(t\,\omega_j), \cos(t\,\omega_j)]_{j<dim/2}`, :math:`\omega_j = 10000^{-j/(dim/2-1)}`,
    zero-padded when ``dim`` is odd. In float32, or float64 for float64 times."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000.0) / max(half - 1, 1)))
    angles = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as U[0,1) ≥ p: on CPU this is about twice as fast as
    the Bernoulli sampler behind ``F.dropout`` (same distribution; uses the global RNG likewise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)  # fused kernels elsewhere
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


class ResidualBlock(nn.Module):
    """x ↦ skip(x) + conv₂(dropout(SiLU(GN(conv₁(SiLU(GN(x))) + W·SiLU(temb))))). (B, C_in, H, W) → (B, C_out, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = _conv(in_ch, out_ch)
        self.temb_proj = _linear(temb_ch, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = Dropout(dropout)
        self.conv2 = _conv(out_ch, out_ch, scale=0.0)
        self.skip = _conv(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act is SiLU(temb), computed once per forward for all blocks.
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    r"""Single-head self-attention over the H·W positions, with a residual connection:
    x + W_o · softmax(Q Kᵀ/√C) V, Q, K, V = W_{q,k,v} · GN(x) per position. (B, C, H, W) → same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        # One (3C × C) projection: a single matmul instead of three 1×1 convolutions.
        self.qkv = _linear(channels, 3 * channels)
        self.proj_out = _linear(channels, channels, scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # (B, C, H, W) → (B, H·W, C): a view when x is channels-last, one copy otherwise.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, H·W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels-last NCHW view
        return x + h


class ResAttnBlock(nn.Module):
    """A residual block, followed by self-attention when ``attention`` is set."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResidualBlock(in_ch, out_ch, temb_ch, dropout)
        self.attn = SelfAttention(out_ch) if attention else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.res(x, temb_act)
        return self.attn(h) if self.attn is not None else h


class Downsample(nn.Module):
    """3×3 convolution with stride 2: (B, C, H, W) → (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 convolution: (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net; ``forward(y, t)`` maps y of shape (B, in_channels, image_size, image_size)
    and times t of shape (B,) in [0, T] to a tensor shaped like y (module docstring for details).

    Args:
        in_channels: image channels (3 for CIFAR-10, 1 for MNIST); also the output channels.
        image_size: height = width of the input; must be divisible by 2^(len(channel_mult) − 1).
        base_channels: channels of the first level; level i has base_channels·channel_mult[i].
        channel_mult: one multiplier per resolution level.
        num_res_blocks: residual blocks per level going down (one more going up).
        attn_resolutions: resolutions (feature-map side lengths) with self-attention; the middle
            always has attention.
        dropout: dropout probability inside residual blocks.
        time_scale: the embedding sees t·time_scale.
        learned_variance: output twice ``in_channels``, the mean's and then a learned reverse
            variance's (:mod:`sdeflow.nets.heads`; :func:`sdeflow.nets.make_net` wraps such a net).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, base_channels: int = 128,
                 channel_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.1, time_scale: float = 1000.0, learned_variance: bool = False,
                 num_classes: int = 0):
        super().__init__()
        in_channels = check_positive_int("in_channels", in_channels)
        image_size = check_positive_int("image_size", image_size)
        base_channels = check_positive_int("base_channels", base_channels)
        num_res_blocks = check_positive_int("num_res_blocks", num_res_blocks)
        channel_mult = tuple(check_positive_int("channel_mult entries", m) for m in channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must name at least one resolution level")
        if image_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"image_size must be divisible by 2^(len(channel_mult) - 1) = "
                             f"{2 ** (len(channel_mult) - 1)}; got {image_size}")
        if base_channels < 2:
            raise ValueError(f"base_channels must be at least 2 (sinusoidal embedding); got {base_channels}")
        dropout = check_decay("dropout", dropout)
        self.in_channels, self.image_size = in_channels, image_size
        self.time_scale = float(time_scale)

        self.base_channels = base_channels
        temb_ch = 4 * base_channels
        self.time_embed = nn.Sequential(_linear(base_channels, temb_ch), nn.SiLU(), _linear(temb_ch, temb_ch))
        # Class-conditional (num_classes > 0): a class's vector is added to the time embedding.
        self.num_classes = check_nonneg_int("num_classes", num_classes)
        self.class_embed = ClassEmbedding(self.num_classes, temb_ch) if self.num_classes else None
        self.conv_in = _conv(in_channels, base_channels)

        # Going down, every module's output is stored as a skip for the way up.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                self.down.append(ResAttnBlock(ch, out_ch, temb_ch, dropout, resolution in attn_resolutions))
                ch = out_ch
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                resolution //= 2
                skip_channels.append(ch)

        self.mid = nn.ModuleList([ResAttnBlock(ch, ch, temb_ch, dropout, attention=True),
                                  ResAttnBlock(ch, ch, temb_ch, dropout, attention=False)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks + 1):
                self.up.append(ResAttnBlock(ch + skip_channels.pop(), out_ch, temb_ch, dropout,
                                            resolution in attn_resolutions))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                resolution *= 2

        self.norm_out = group_norm(ch)
        self.conv_out = _conv(ch, in_channels * (2 if learned_variance else 1), scale=0.0)

    def compile_blocks(self, **compile_kwargs) -> "UNet":
        """``torch.compile`` every residual/attention block in place (static shapes) and return self.

        Why per block rather than the whole network: blocks of equal shapes share one compiled
        graph, so compilation is several times shorter on a CPU, and what it gains — fusing
        GroupNorm, SiLU, dropout and the residual additions around each convolution — is inside
        the blocks. Costs minutes of compilation on the first training step and on the first
        evaluation (see ``benchmarks/throughput.py``); pays off for long runs.
        """
        import torch._dynamo as dynamo

        # One compiled graph per (block shape, train/eval, grad mode): allow all of them.
        needed = 8 * (len(self.down) + len(self.mid) + len(self.up))
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), needed))
        compile_kwargs.setdefault("dynamic", False)
        for module in self.modules():
            if isinstance(module, ResAttnBlock):
                module.compile(**compile_kwargs)
        return self

    def forward(self, y: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if y.ndim != 4 or tuple(y.shape[1:]) != expected:
            raise ValueError(f"UNet input must have shape (B, {', '.join(map(str, expected))}); "
                             f"got {tuple(y.shape)}")
        if t.ndim != 1 or t.shape[0] != y.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({y.shape[0]},); got {tuple(t.shape)}")
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            # A channels-last network would otherwise convert at the first convolution anyway.
            y = y.contiguous(memory_format=torch.channels_last)

        temb = self.time_embed(sinusoidal_embedding(t * self.time_scale, self.base_channels).to(y.dtype))
        if self.class_embed is not None:
            temb = temb + self.class_embed(labels, y.shape[0]).to(y.dtype)
        elif labels is not None:
            check_labels(labels, 0, y.shape[0])  # refuses: the network is unconditional
        temb_act = F.silu(temb)

        h = self.conv_in(y)
        skips = [h]
        for module in self.down:
            h = module(h, temb_act) if isinstance(module, ResAttnBlock) else module(h)
            skips.append(h)
        for module in self.mid:
            h = module(h, temb_act)
        for module in self.up:
            if isinstance(module, ResAttnBlock):
                h = module(torch.cat([h, skips.pop()], dim=1), temb_act)
            else:
                h = module(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def make_unet(preset: str, in_channels: int = 3, image_size: int = 32, **overrides) -> UNet:
    """A :class:`UNet` with the hyper-parameters of ``PRESETS[preset]``, any of which
    ``overrides`` replaces (e.g. ``dropout=0.0``)."""
    check_choice("preset", preset, tuple(PRESETS))
    unknown = set(overrides) - {"base_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
                                "dropout", "time_scale", "learned_variance", "num_classes"}
    if unknown:
        raise ValueError(f"unknown UNet option(s) {sorted(unknown)}; allowed: base_channels, channel_mult, "
                         f"num_res_blocks, attn_resolutions, dropout, time_scale, learned_variance, num_classes")
    return UNet(in_channels=in_channels, image_size=image_size, **{**PRESETS[preset], **overrides})
