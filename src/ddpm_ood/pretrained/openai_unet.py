"""The UNet of improved-diffusion (Nichol & Dhariwal 2021) and guided-diffusion (Dhariwal & Nichol 2021), written
from their published architecture so that their released state dicts load strictly (every key and shape).

Architecture (2D, images (N, 3, H, W); module names are the state-dict keys):
- ``time_embed``: sinusoidal embedding of t (dim = model_channels; cos half first, frequencies
  exp(-ln(10000) i / half)) -> Linear(mc, 4mc) (``time_embed.0``) -> SiLU -> Linear(4mc, 4mc) (``time_embed.2``).
- ``input_blocks``: [0] a 3x3 conv in -> ch0 = channel_mult[0] * mc; then per level (resolution ds = 1, 2, 4, ...)
  ``num_res_blocks`` x [ResBlock -> mult * mc (+ AttentionBlock where ds is an attention resolution)], and,
  except at the last level, a downsampler (a stride-2 3x3 conv ``op``, or with ``resblock_updown`` a ResBlock
  with 2x2 average pooling inside).
- ``middle_block``: ResBlock, AttentionBlock, ResBlock.
- ``output_blocks``: levels reversed, ``num_res_blocks + 1`` x [ResBlock(ch + skip -> mult * mc) (+ attention)],
  the last of each level (except level 0) followed by an upsampler (nearest 2x then a 3x3 ``conv``, or a ResBlock
  with nearest upsampling inside).
- ``out``: GroupNorm -> SiLU -> 3x3 conv to out_channels (3, or 6 with learned sigmas).
ResBlock: ``in_layers`` (GroupNorm(32), SiLU, 3x3 conv), ``emb_layers`` (SiLU, Linear(4mc, out or 2 out with
scale-shift norm)), ``out_layers`` (GroupNorm, SiLU, Dropout, 3x3 conv), ``skip_connection`` (identity, or a 1x1
conv when the channels change); scale-shift: h = norm(h) * (1 + scale) + shift. AttentionBlock: ``norm``, ``qkv``
(1x1 conv1d, 3C), heads (num_heads, or C / num_head_channels), softmax(q k^T / sqrt(d)) v with q and k each scaled
by d^-1/4, ``proj_out`` (1x1 conv1d), residual. Heads split before q/k/v (the "legacy" order) unless
``use_new_attention_order``. GroupNorm computes in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # GroupNorm groups of every normalisation layer


@dataclass(frozen=True)
class OpenAIUNetConfig:
    """The architecture flags (names as the openai scripts spell them, resolved: ``attention_ds`` are the
    downsampling rates, image_size // resolution, where attention runs; ``num_head_channels`` -1 = use
    ``num_heads``)."""

    image_size: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple[float, ...]
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    in_channels: int = 3


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps (may be fractional) -> (N, dim) float32: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class _Norm(nn.GroupNorm):
    """GroupNorm in float32 whatever the input's precision (as the published models were trained)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> nn.GroupNorm:
    return _Norm(GROUPS, channels)


class _Resample(nn.Module):
    """2x nearest upsampling or 2x2 average-pool downsampling, with a 3x3 conv (stride 2 when downsampling)
    when ``use_conv``."""

    def __init__(self, channels: int, up: bool, use_conv: bool) -> None:
        super().__init__()
        self.up = up
        if use_conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.use_conv else x
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, scale_shift: bool,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd = _Resample(channels, up=up, use_conv=False)
            self.x_upd = _Resample(channels, up=up, use_conv=False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class _Attention(nn.Module):
    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool) -> None:
        super().__init__()
        self.heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.heads:
            raise ValueError(f"{channels} attention channels do not split into {self.heads} heads")
        self.new_order = new_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, d = qkv.shape[-1], c // self.heads
        if self.new_order:  # q, k, v first, then heads
            q, k, v = (part.reshape(b * self.heads, d, length) for part in qkv.chunk(3, dim=1))
        else:  # heads first, then q, k, v within each head
            q, k, v = qkv.reshape(b * self.heads, 3 * d, length).split(d, dim=1)
        scale = d ** -0.25
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class _Sequence(nn.ModuleList):
    """Layers applied in turn, ResBlocks given the time embedding too."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class OpenAIUNet(nn.Module):
    """``forward(x, t)``: x (N, 3, H, W) in the model's data range [-1, 1], t (N,) the model's timesteps (float
    when rescaled) -> (N, out_channels, H, W)."""

    def __init__(self, config: OpenAIUNetConfig) -> None:
        super().__init__()
        c = config
        mc, emb = c.model_channels, 4 * c.model_channels
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        def res(cin: int, cout: int, **updown: bool) -> _ResBlock:
            return _ResBlock(cin, emb, cout, c.dropout, c.use_scale_shift_norm, **updown)

        def attention(ch: int, heads: int) -> _Attention:
            return _Attention(ch, heads, c.num_head_channels, c.use_new_attention_order)

        ch = input_ch = int(c.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Sequence([nn.Conv2d(c.in_channels, ch, 3, padding=1)])])
        skips, ds = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in c.attention_ds:
                    layers.append(attention(ch, c.num_heads))
                self.input_blocks.append(_Sequence(layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else _Resample(ch, up=False, use_conv=True)
                self.input_blocks.append(_Sequence([down]))
                skips.append(ch)
                ds *= 2
        self.middle_block = _Sequence([res(ch, ch), attention(ch, c.num_heads), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in c.attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else _Resample(ch, up=True, use_conv=True))
                    ds //= 2
                self.output_blocks.append(_Sequence(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, c.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def default_channel_mult(image_size: int) -> tuple[float, ...] | None:
    """The channel multipliers both codebases pick from the image size when ``channel_mult`` is not given (None
    for a size neither has)."""
    return {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4),
            32: (1, 2, 2, 2)}.get(image_size)


def attention_rates(image_size: int, resolutions: Sequence[int]) -> tuple[int, ...]:
    """``--attention_resolutions`` (feature-map sides, e.g. 16,8) -> the downsampling rates image_size // r."""
    return tuple(image_size // int(r) for r in resolutions)
