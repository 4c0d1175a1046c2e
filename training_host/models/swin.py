"""Residual Swin Transformer (paper step 8): classify every block of a PosFAR residual field.

Input: residual tokens r_i (B, h, w, d_f), one per patch of the stride-8 feature grid.  They are divided
by a per-channel scale fitted on good residuals (a buffer, so it travels inside ``swin.onnx``), embedded
linearly, passed through Swin blocks that alternate regular and shifted ``window`` x ``window`` attention
windows with a relative position bias, and a per-token head gives two logits (normal, anomalous).

Fields larger than the training window are covered by sliding windows whose overlapping probabilities
are averaged (:meth:`ResidualSwin.forward`), so the paper profile (64 x 64 grid) runs a model trained on
32 x 32 crops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SwinShape:
    """Architecture of the residual classifier; stored in the bundle manifest."""

    in_dim: int
    embed_dim: int = 64
    depth: int = 2
    heads: int = 4
    window: int = 8
    mlp_ratio: float = 2.0
    train_window: int = 32  # tokens per side of the training crop and of the inference sliding window
    window_stride: int = 16  # step of the inference sliding window when the grid is larger
    log_input: bool = True  # embed log(1 + r / scale): moderate residuals are not drowned by the largest
    grid: tuple[int, int] | None = None  # full residual grid; with it, a learned absolute position embedding
    magnitude_skip: bool = False  # the block's residual magnitude as an input and a direct term of the logit


#: what the shift mask adds to the attention logits of token pairs from different regions.  Their weights must be
#: negligible: e^-40 ~ 4e-18 times e^(how far a masked pair's own logit is above its row's largest unmasked one),
#: so that even 64 of them stay far below float32's resolution of the softmax's sum (2^-24) and the figures are
#: those of an exact zero.  And they must not be subnormal, which CPUs handle slowly: at -100 (the Swin paper's
#: code) torch's weights were (e^-100 ~ 4e-44), and at -1e4 ONNX Runtime's softmax, which clamps exp()'s argument
#: at -88.4, still made them so (e^-88.4 ~ 4e-39).  Measured in the fast profile's trained Swin on 37 MTD test
#: images (a one-off script): a masked pair's logit at most 5.4 above its row's largest unmasked one (so weights
#: below e^-34.6 ~ 1e-15; above 18 they could matter), and a masked logit at -40 at most 56 below its row's largest
#: (31 to spare before exp() gives subnormals).  The fast profile's Swin graph under ONNX Runtime: 1.87 ms at -100
#: against 1.60 at -1e4 in one run, 1.62 at -1e4 against 1.48 at -40 in another (its masked softmax 221 -> 46 us);
#: its fit 160 s at -100, 128 s at -1e4 and -40, the same figures every way (README, "Engines: accuracy and
#: speed").  Within float16's range, for TensorRT's fp16 plans, where e^-40 is exactly 0.
MASKED = -40.0


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _window_merge(windows: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _relative_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]  # (window^2, window^2)


def _shift_mask(h: int, w: int, window: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """Attention mask (nW, N, N) that keeps tokens of different regions apart after the cyclic shift.

    Cached: it depends only on the shapes, and training would otherwise rebuild it in every block and step.  Not
    while the model is traced for export: the tracer's tensor would be cached and later handed to plain calls
    (an exported model that had never run eagerly then failed its ONNX check).  Cached per device: on a GPU the
    mask is copied there once, not in every block (and not while a CUDA graph is being captured)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _build_shift_mask(h, w, window, shift)
    return _cached_shift_mask(h, w, window, shift, torch.device(device if device is not None else "cpu"))


def _build_shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    region = torch.zeros(1, h, w, 1)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = label
            label += 1
    ids = _window_partition(region, window).squeeze(-1)  # (nW, N)
    differs = ids[:, :, None] != ids[:, None, :]
    return differs.float() * MASKED


@functools.lru_cache(maxsize=16)
def _cached_shift_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    return _build_shift_mask(h, w, window, shift).to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        self.register_buffer("bias_index", _relative_index(window).flatten(), persistent=False)
        self.n = window * window

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (bw, heads, n, n)
        bias = self.bias_table[self.bias_index].reshape(self.n, self.n, self.heads).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.reshape(bw // n_windows, n_windows, self.heads, n, n) + mask[None, :, None]
            attn = attn.reshape(bw, self.heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        shift = self.shift if min(h, w) > self.window else 0  # one window: nothing to shift across
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            mask = _shift_mask(h, w, self.window, shift, y.device).to(device=y.device, dtype=y.dtype)
        else:
            mask = None
        y = _window_merge(self.attn(_window_partition(y, self.window), mask), self.window, b, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class ResidualSwin(nn.Module):
    """Residual field (B, h, w, d_f) -> per-block logits; ``forward`` gives anomaly probabilities."""

    def __init__(self, shape: SwinShape) -> None:
        super().__init__()
        if shape.train_window % shape.window:
            raise ValueError(f"train_window {shape.train_window} must be a multiple of window {shape.window}")
        self.shape = shape
        self.register_buffer("input_scale", torch.ones(shape.in_dim))
        # no LayerNorm on the embedding: it would make the classifier blind to the residual's magnitude,
        # which is the main evidence; the pre-norm blocks keep it in the residual stream
        self.embed = nn.Linear(shape.in_dim, shape.embed_dim)
        # Normal residuals are not stationary: border blocks match worse than the middle (padding, part edges),
        # and the residual itself carries no position.  A learned embedding per grid position lets the
        # classifier learn where large residuals are normal; windows and crops use their slice of it.
        self.pos_embed = None
        if shape.grid is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, shape.grid[0], shape.grid[1], shape.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            SwinBlock(shape.embed_dim, shape.heads, shape.window, 0 if i % 2 == 0 else shape.window // 2,
                      shape.mlp_ratio)
            for i in range(shape.depth)
        )
        self.head_norm = nn.LayerNorm(shape.embed_dim)
        self.head = nn.Linear(shape.embed_dim, 2)
        self.apply(self._init)
        # Magnitude skip: m = log of the block's mean scaled residual, embedded with the channels and added to
        # the anomalous logit as a * m + b.  The distance alone finds small pits the plain Swin learns to
        # erase (measured on MTD); with the skip the classifier starts from that evidence and learns
        # corrections to it, instead of having to rebuild it through the log-compressed channels.
        self.magnitude_embed = self.skip = None
        if shape.magnitude_skip:
            self.magnitude_embed = nn.Linear(1, shape.embed_dim)
            nn.init.zeros_(self.magnitude_embed.weight)
            nn.init.zeros_(self.magnitude_embed.bias)
            self.skip = nn.Parameter(torch.tensor([1.0, 0.0]))  # (a, b)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def set_input_scale(self, residuals: torch.Tensor) -> None:
        """Per-channel scale from good residuals (..., d_f): their RMS, so embedded inputs are O(1)."""
        flat = residuals.reshape(-1, residuals.shape[-1]).float()
        self.input_scale.copy_(flat.pow(2).mean(0).sqrt().clamp_min(1e-6))

    def logits(self, field: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(B, h, w, d_f) with h, w multiples of the window -> (B, h, w, 2).

        ``offset``: where this field (a crop or sliding window) starts in the full grid.
        """
        h, w = field.shape[1:3]
        if h % self.shape.window or w % self.shape.window:
            raise ValueError(f"residual grid {h}x{w} must be a multiple of the window {self.shape.window}")
        x = field / self.input_scale
        magnitude = None
        if self.skip is not None:
            magnitude = torch.log(x.mean(-1, keepdim=True).clamp_min(1e-6))  # (B, h, w, 1)
        if self.shape.log_input:
            x = torch.log1p(x)
        x = self.embed(x)
        if magnitude is not None:
            x = x + self.magnitude_embed(magnitude)
        if self.pos_embed is not None:
            top, left = offset
            if top + h > self.pos_embed.shape[1] or left + w > self.pos_embed.shape[2]:
                raise ValueError(f"residual field {h}x{w} at {offset} exceeds the model's grid {self.shape.grid}")
            x = x + self.pos_embed[:, top : top + h, left : left + w]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.head_norm(x))
        if magnitude is not None:
            skip = self.skip[0] * magnitude + self.skip[1]
            logits = logits + torch.cat([torch.zeros_like(skip), skip], dim=-1)
        return logits

    def _starts(self, size: int) -> list[int]:
        win, stride = self.shape.train_window, self.shape.window_stride
        if size <= win:
            return [0]
        starts = list(range(0, size - win + 1, stride))
        if starts[-1] != size - win:
            starts.append(size - win)
        return starts

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        """(B, h, w, d_f) -> anomaly probability (B, h, w); sliding windows averaged on large grids."""
        h, w = field.shape[1:3]
        win = self.shape.train_window
        if h <= win and w <= win:
            return self.logits(field).softmax(-1)[..., 1]
        total = field.new_zeros(field.shape[:3])
        count = field.new_zeros(field.shape[:3])
        for top in self._starts(h):
            for left in self._starts(w):
                hs, ws = slice(top, min(top + win, h)), slice(left, min(left + win, w))
                total[:, hs, ws] += self.logits(field[:, hs, ws], (top, left)).softmax(-1)[..., 1]
                count[:, hs, ws] += 1.0
        return total / count


class SwinEnsemble(nn.Module):
    """Several residual Swins of one shape, their probabilities averaged: one graph, the same contract as one Swin.

    Why: Swins trained on other synthetic anomalies and from other starts err in different places; their mean
    is steadier from one fit to the next (MTD: the PRO of three seeds' maps 0.803 / 0.786 / 0.809 alone, 0.807 /
    0.806 / 0.807 with the three Swins averaged: docs/sweeps/map_study_bands.md, rows "with the swin of 3
    seeds"; the fine profile, three members in one bundle: docs/sweeps/fine_ensemble.md).
    """

    def __init__(self, members: list[ResidualSwin]) -> None:
        super().__init__()
        if not members or len({m.shape for m in members}) != 1:
            raise ValueError("an ensemble needs one or more Swins of the same shape")
        self.members = nn.ModuleList(members)
        self.shape = members[0].shape

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(field) for m in self.members]).mean(0)


class SwinForExport(nn.Module):
    """The graph in ``swin.onnx``: residual tokens (1, M, d_f) on a fixed grid -> probabilities (1, M)."""

    def __init__(self, model: ResidualSwin | SwinEnsemble, grid: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.grid = grid

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        b, _, c = residual.shape
        prob = self.model(residual.reshape(b, self.grid[0], self.grid[1], c))
        return prob.reshape(b, -1)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float,
               token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary focal loss over tokens; labels 1 anomalous, 0 normal, -1 ignored.  Mean over labelled tokens.

    alpha weights the anomalous class and 1 - alpha the normal one; gamma down-weights easy tokens.
    ``token_weight`` (the labels' shape) multiplies each token's term, e.g. :func:`region_balanced_weights`.
    """
    logits = logits.reshape(-1, 2)
    labels = labels.reshape(-1).long()
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, labels = logits[keep], labels[keep]
    logp = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    p = logp.exp()
    weight = torch.where(labels == 1, torch.full_like(p, alpha), torch.full_like(p, 1.0 - alpha))
    if token_weight is not None:
        weight = weight * token_weight.reshape(-1).to(weight)[keep]
    return (-weight * (1.0 - p).pow(gamma) * logp).mean()


def region_balanced_weights(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Per-token weights that let small anomalous regions count: a block of an anomalous region of s blocks
    (8-connected, per field) weighs s^-power, rescaled so the batch's anomalous blocks keep their total weight;
    normal and ignored blocks weigh 1.

    Why: the block loss is a sum over blocks, so a finish band of 300 blocks teaches the Swin 100 times what a
    3-block pit does, and it learns bands and forgets pits; PRO, which weighs every region equally, pays for
    that.  power 1 gives every region the same total weight, 0 is the plain loss.
    """
    from scipy import ndimage

    weights = torch.ones(labels.shape, dtype=torch.float32)
    if power == 0.0:
        return weights.to(labels.device)
    positive = (labels == 1).cpu().numpy()
    if not positive.any():
        return weights.to(labels.device)
    eight = np.ones((3, 3), dtype=bool)
    raw = np.zeros(positive.shape, dtype=np.float64)
    for i in range(positive.shape[0]):
        regions, n = ndimage.label(positive[i], structure=eight)
        if n:
            sizes = np.bincount(regions.ravel())[1:].astype(np.float64)
            raw[i][regions > 0] = sizes[regions[regions > 0] - 1] ** -power
    raw[positive] *= positive.sum() / raw[positive].sum()
    weights[torch.from_numpy(positive)] = torch.from_numpy(raw[positive]).float()
    return weights.to(labels.device)


def soft_focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, alpha: float,
                    gamma: float) -> torch.Tensor:
    """Focal loss against soft anomaly targets t in [0, 1] (MixUp, guessed labels); ``weight`` 0 ignores a token.

    The modulating factor is |t - p|^gamma (the "quality focal loss" form): for hard targets it is exactly
    the focal loss, and unlike (1 - p_t)^gamma applied to a mix of the two class terms its minimum stays at
    p = t, so soft targets are not pushed toward 0.5 (with gamma 4 they were, measured in a test).
    """
    logits = logits.reshape(-1, 2)
    targets = targets.reshape(-1).float()
    weight = weight.reshape(-1).float()
    logp = F.log_softmax(logits, dim=-1)
    p = logp[:, 1].exp()
    bce = -(targets * logp[:, 1] + (1.0 - targets) * logp[:, 0])
    class_weight = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    loss = class_weight * (targets - p).abs().pow(gamma) * bce * weight
    return loss.sum() / weight.sum().clamp_min(1.0)


def mask_and_jitter(field: torch.Tensor, mask_ratio: float, jitter: float, generator: torch.Generator
                    ) -> torch.Tensor:
    """Eq. 18 augmentation: zero a random ``mask_ratio`` of tokens and scale each token by exp(jitter * N(0,1)).

    A masked token looks like a perfect match, so the classifier must also read its neighbours; the jitter
    keeps it from keying on exact residual magnitudes, which move with the bank and the references.
    """
    b, h, w, _ = field.shape
    out = field
    if jitter > 0:
        noise = torch.randn(b, h, w, 1, generator=generator, dtype=field.dtype)
        out = out * torch.exp(jitter * noise)
    if mask_ratio > 0:
        keep = (torch.rand(b, h, w, 1, generator=generator) >= mask_ratio).to(field.dtype)
        out = out * keep
    return out
