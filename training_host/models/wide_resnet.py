"""Self-contained definition of torchvision's ``wide_resnet50_2`` trunk.

torchvision cannot be installed next to the torch build used here, so this module re-implements the
network with the *exact* module names of ``torchvision.models.resnet`` (v1.5: stride on the 3x3 conv,
downsample = conv1x1 + BN).  ``state_dict()`` keys and shapes are identical to torchvision's, so an
ImageNet checkpoint converted to safetensors (``tools/convert_torch_weights.py``) loads with strict key
checking.

Only the feature pyramid layer1..layer3 is computed in :meth:`WideResNet50Trunk.forward`; ``layer4``
and ``fc`` exist purely so that the key set matches the published checkpoint.

Weights are read from ``.safetensors`` only: pickle checkpoints (``.pth``/``.pt``) are refused here,
convert them once with ``python tools/convert_torch_weights.py IN.pth OUT.safetensors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["Bottleneck", "WideResNet50Trunk", "load_wide_resnet50_2"]

CONVERTER_HINT = "python tools/convert_torch_weights.py IN.pth OUT.safetensors"

# Prefixes that wrappers (DataParallel, Lightning, timm-style containers) commonly add to every key.
_KNOWN_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.")
_PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}
_MAX_LISTED = 5


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes,
        out_planes,
        kernel_size=3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (ResNet v1.5: the stride sits on ``conv2``, the 3x3 conv)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class WideResNet50Trunk(nn.Module):
    """``wide_resnet50_2`` with torchvision's module names; forward returns [layer1, layer2, layer3]."""

    out_channels: tuple[int, int, int] = (256, 512, 1024)
    out_strides: tuple[int, int, int] = (4, 8, 16)

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), width_per_group: int = 128,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.dilation = 1
        self.groups = 1
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        # Same initialisation as torchvision (zero_init_residual=False).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [
            Bottleneck(self.inplanes, planes, stride, downsample, self.groups, self.base_width, self.dilation)
        ]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(
                Bottleneck(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                           dilation=self.dilation)
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]


def _strip_common_prefix(state: Mapping[str, torch.Tensor], expected: Mapping[str, object]) -> dict:
    """Remove a wrapper prefix (``module.``, ``model.``, ...) shared by *every* key, possibly nested."""
    state = dict(state)
    top_level = {k.split(".", 1)[0] for k in expected}
    for _ in range(4):  # e.g. "model.module." -> at most a few nested wrappers
        if not state or any(k in expected for k in state):
            break
        first = {k.split(".", 1)[0] for k in state}
        if len(first) != 1 or not all("." in k for k in state):
            break
        prefix = next(iter(first)) + "."
        if prefix not in _KNOWN_PREFIXES and prefix[:-1] in top_level:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _fmt(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}]{more}"


def load_wide_resnet50_2(weights_path: str | Path) -> WideResNet50Trunk:
    """Build the trunk and load torchvision ``wide_resnet50_2`` weights from a ``.safetensors`` file.

    Keys must match torchvision's exactly (an optional wrapper prefix such as ``module.``/``model.``
    shared by every key is stripped).  Missing or unexpected keys and shape mismatches raise
    :class:`ValueError`.  BatchNorm ``num_batches_tracked`` counters may be absent (old torchvision
    checkpoints predate them; they do not affect eval-mode outputs), exactly as torch's own strict
    ``load_state_dict`` tolerates.  The model is returned in eval mode with ``requires_grad=False``.
    """
    path = Path(weights_path)
    suffix = path.suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{path}: pickle checkpoints ({suffix}) are not loaded, because unpickling can execute "
            f"arbitrary code. Convert the file once (on a file you trust) with `{CONVERTER_HINT}` "
            "and pass the .safetensors file instead."
        )
    if suffix != ".safetensors":
        raise ValueError(
            f"{path}: expected a .safetensors weights file (torchvision key names); "
            f"convert a torchvision checkpoint with `{CONVERTER_HINT}`."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file: {exc}") from exc

    # Build on the meta device (no 68M-parameter random init) and assign the loaded tensors below.
    with torch.device("meta"):
        model = WideResNet50Trunk()
    expected = model.state_dict()
    state = _strip_common_prefix(raw, expected)

    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_fmt(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) {_fmt(mismatched)}")
    if problems:
        raise ValueError(
            f"{path}: does not match torchvision wide_resnet50_2: " + "; ".join(problems)
        )

    # Keep the model float32 whatever the file's float dtype (assign=True would adopt it otherwise).
    for k, v in state.items():
        if v.dtype != expected[k].dtype:
            state[k] = v.to(expected[k].dtype)
    # Every remaining key is expected; only num_batches_tracked may be absent, which torch's strict
    # load fills in itself (no _metadata -> BatchNorm treats the dict as a pre-v2 checkpoint).
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # defensive: nothing may stay uninitialised
        raise ValueError(f"{path}: tensors not loaded: {_fmt(leftover)}")
    model.eval()
    model.requires_grad_(False)
    return model
