"""Patch features (paper steps 1-2) as one torch module that exports to ``backbone.onnx``.

image in [0, 1] -> mean/std -> trunk stages -> 3x3 local average (zero padding counted by default: measured
on MTD, excluding it let the border patches set the maps' scale) -> one stride-8 grid -> concat ->
channel pooling to d_f -> + lambda_P * eta (position code) = PCFs, plus the retrieval descriptor
(the earliest stage average-pooled to a small grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.core.position import position_code
from training_host.config import BackboneConfig


class PatchFeatureExtractor(nn.Module):
    """Frozen trunk + aggregation; forward(image) -> (pcf (B, M, d_f), descriptor (B, cells, C))."""

    def __init__(self, trunk: nn.Module, input_hw: tuple[int, int], d_f: int, lambda_p: float,
                 mean: tuple[float, ...], std: tuple[float, ...], stride: int = 8,
                 descriptor_grid: tuple[int, int] = (8, 8), pool_padding: str = "zeros") -> None:
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        height, width = input_hw
        if height % 32 or width % 32:
            raise ValueError(f"input size must be a multiple of 32, got {input_hw}")
        self.input_hw = (height, width)
        self.grid = (height // stride, width // stride)
        self.stride = stride
        total = int(sum(trunk.out_channels))
        self.d_f = min(d_f, total)
        if self.d_f % 4:
            raise ValueError(f"d_f must be a multiple of 4 (position code), got {self.d_f}")
        self.lambda_p = lambda_p
        if pool_padding not in ("zeros", "excluded"):
            raise ValueError(f"pool_padding must be 'zeros' or 'excluded', got {pool_padding!r}")
        self.count_include_pad = pool_padding == "zeros"
        first_stride = trunk.out_strides[0]
        gh, gw = descriptor_grid
        fh, fw = height // first_stride, width // first_stride
        if fh % gh or fw % gw:
            raise ValueError(f"descriptor grid {descriptor_grid} must divide the first stage map {(fh, fw)}")
        self.descriptor_grid = (gh, gw)
        self.descriptor_kernel = (fh // gh, fw // gw)
        self.descriptor_channels = int(trunk.out_channels[0])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        eta = position_code(*self.grid, self.d_f)  # (d_f, h, w)
        self.register_buffer("position", torch.from_numpy(eta).reshape(1, self.d_f, -1).transpose(1, 2).contiguous())
        self.eval()

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        """Always stays in eval mode: the trunk is frozen, its batch-norm statistics must not move."""
        return super().train(False)

    def patch_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregated features (B, d_f, h, w) without the position code, and the descriptor."""
        x = (image - self.mean) / self.std
        stages = self.trunk(x)
        maps = []
        for feat in stages:
            feat = F.avg_pool2d(feat, kernel_size=3, stride=1, padding=1, count_include_pad=self.count_include_pad)
            if feat.shape[-2:] != self.grid:
                feat = F.interpolate(feat, size=self.grid, mode="bilinear", align_corners=False)
            maps.append(feat)
        feats = torch.cat(maps, dim=1)
        if feats.shape[1] != self.d_f:  # channel pooling, as PatchCore does
            b, c, h, w = feats.shape
            pooled = F.adaptive_avg_pool1d(feats.reshape(b, c, h * w).transpose(1, 2), self.d_f)
            feats = pooled.transpose(1, 2).reshape(b, self.d_f, h, w)
        desc = F.avg_pool2d(stages[0], kernel_size=self.descriptor_kernel, stride=self.descriptor_kernel)
        descriptor = desc.flatten(2).transpose(1, 2)  # (B, cells, C)
        return feats, descriptor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, descriptor = self.patch_features(image)
        pcf = feats.flatten(2).transpose(1, 2) + self.lambda_p * self.position
        return pcf, descriptor


def build_trunk(cfg: BackboneConfig) -> nn.Module:
    """The frozen ImageNet trunk named in the config (offline weights only)."""
    if cfg.name.startswith("efficientnet_lite"):
        from training_host.models.efficientnet_lite import load_efficientnet_lite

        return load_efficientnet_lite(cfg.name, tuple(cfg.layers), Path(cfg.weights) if cfg.weights else None)
    if cfg.name == "wide_resnet50_2":
        if not cfg.weights:
            raise ValueError("backbone.weights: wide_resnet50_2 needs a torchvision weights file converted to "
                             ".safetensors (tools/convert_torch_weights.py); nothing is downloaded")
        from training_host.models.wide_resnet import load_wide_resnet50_2

        trunk = load_wide_resnet50_2(Path(cfg.weights))
        return trunk
    raise ValueError(f"backbone.name: unknown backbone '{cfg.name}' (efficientnet_lite0/1/2, wide_resnet50_2)")


def build_extractor(cfg: BackboneConfig, input_hw: tuple[int, int], lambda_p: float) -> PatchFeatureExtractor:
    trunk = build_trunk(cfg)
    mean, std = (trunk.mean, trunk.std) if hasattr(trunk, "mean") else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return PatchFeatureExtractor(trunk, input_hw, cfg.d_f, lambda_p, mean, std,
                                 descriptor_grid=tuple(cfg.descriptor_grid), pool_padding=cfg.pool_padding)


@torch.inference_mode()
def extract(extractor: PatchFeatureExtractor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a batch of float32 (B, 3, H, W) images in [0, 1]; numpy outputs."""
    pcf, desc = extractor(torch.from_numpy(images))
    return pcf.numpy(), desc.numpy()
