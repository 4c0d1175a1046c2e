#!/usr/bin/env python3
"""Convert a torchvision-style PyTorch checkpoint (``.pth``/``.pt``) to ``.safetensors``.

    python tools/convert_torch_weights.py IN.pth OUT.safetensors

This is a ONE-TIME step, to be run on a checkpoint you trust (e.g. torchvision's published
``wide_resnet50_2-*.pth``).  The file is read with ``torch.load(..., weights_only=True)``, torch's
restricted unpickler that only rebuilds tensors and plain containers, but it is still a pickle: the
runtime itself (``training_host.models.wide_resnet.load_wide_resnet50_2``) only ever reads the safetensors
output.

Nested checkpoints (``{"state_dict": {...}}`` or ``{"model": {...}}``, as written by training loops)
are unwrapped; non-tensor entries are skipped with a note.  Tensors are written contiguous and
unshared, as ``safetensors.torch.save_file`` requires.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def unwrap_state_dict(obj: object) -> Mapping:
    """Descend into ``state_dict``/``model`` entries until a mapping holding tensors is reached."""
    for _ in range(8):
        if not isinstance(obj, Mapping):
            raise ValueError(
                f"checkpoint holds a {type(obj).__name__}, not a state dict; save "
                "`model.state_dict()` instead of the whole model"
            )
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no tensors found in checkpoint (top-level keys: {list(obj)[:10]})")
        obj = inner
    raise ValueError("checkpoint nesting too deep")


def convert(src: str | Path, dst: str | Path) -> int:
    """Convert ``src`` (torch checkpoint) to ``dst`` (safetensors). Returns the number of tensors."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: output file must end in .safetensors")
    obj = torch.load(src, map_location="cpu", weights_only=True)
    state = unwrap_state_dict(obj)
    tensors: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            # clone() breaks storage sharing (tied weights, views), which save_file refuses.
            tensors[str(key)] = value.detach().clone().contiguous()
        else:
            skipped.append(str(key))
    if not tensors:
        raise ValueError(f"{src}: no tensors to write")
    if skipped:
        print(f"skipped {len(skipped)} non-tensor entries: {skipped[:10]}", file=sys.stderr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"source": src.name, "format": "pt"})
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a trusted torchvision-style .pth/.pt checkpoint to .safetensors (one-time step)."
    )
    parser.add_argument("src", help="input checkpoint (.pth/.pt), read with torch.load(weights_only=True)")
    parser.add_argument("dst", help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        n = convert(args.src, args.dst)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {n} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
