"""Training across processes and machines with torch.distributed, as ``torchrun`` launches it.

``torchrun`` sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them
(a plain ``weakrest-train fit``) :func:`from_environment` returns :data:`SINGLE` and everything here runs
in one process exactly as before.

Per-image work (backbone features, residual fields, synthetic anomalies) is split by batch: in round r
rank k computes batch ``r * world_size + k``, where the batches are the very ones a single process
computes (the backbone's float results depend on the batch it ran in), and an all-gather hands every
rank every batch in the original order.  So whatever is order-dependent downstream (the coreset's
per-image seeds, the PCA, the reference index) sees exactly the input of a single-process fit, and only
one round of batches is held at a time.  Batches travel as safetensors bytes (no pickle between ranks).

The process group has a timeout, so a rank that stops answering ends a collective with an error instead
of a hang; a rank that dies closes its connections and the others' collectives fail at once, and
torchrun's own monitor ends the remaining workers and names the rank that failed first.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # the longest a rank waits in one collective for the others (torch's own default)
_JSON = "__json__"  # the entry of an exchanged batch that carries its JSON part (error lines, indices)

BatchResult = tuple[dict[str, np.ndarray], Any]  # arrays with one leading row per item, JSON-able extras


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank ``rank`` of ``world_size`` (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"  # gloo | nccl | none (one process, no process group)
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend != "none"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and the bundle and prints the summary."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # -- batches ------------------------------------------------------------------------------------------
    def map_batches(self, n_batches: int, compute: Callable[[int], BatchResult]) -> Iterator[BatchResult]:
        """``compute(b)`` for every batch b in 0..n_batches-1, yielded in order on every rank; each batch is
        computed by rank ``b % world_size`` only."""
        if not self.enabled:
            for b in range(n_batches):
                yield compute(b)
            return
        for first in range(0, n_batches, self.world_size):
            mine = first + self.rank
            local = compute(mine) if mine < n_batches else None
            for k, part in enumerate(self._exchange(local)):
                if first + k < n_batches:
                    if part is None:
                        raise RuntimeError(f"rank {k} sent nothing for batch {first + k}")
                    yield part

    def _exchange(self, local: BatchResult | None) -> list[BatchResult | None]:
        """All-gather one batch result per rank (None where a rank had no batch this round)."""
        data = b""
        if local is not None:
            arrays, extra = local
            payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            payload[_JSON] = np.frombuffer(json.dumps(extra).encode("utf-8"), dtype=np.uint8).copy()
            data = st_save(payload)
        parts = self._all_gather_bytes(data)
        out: list[BatchResult | None] = []
        for blob in parts:
            if not blob:
                out.append(None)
                continue
            arrays = st_load(blob)
            extra = json.loads(arrays.pop(_JSON).tobytes().decode("utf-8"))
            out.append((arrays, extra))
        return out

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = max(1, max(int(s.item()) for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        gathered = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(gathered, buf)
        return [g[: int(s.item())].cpu().numpy().tobytes() for g, s in zip(gathered, sizes, strict=True)]

    # -- files rank 0 reads for everyone ------------------------------------------------------------------
    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (the others pass None)."""
        if not self.enabled:
            assert data is not None
            return data
        size = torch.tensor([len(data) if self.is_main and data is not None else 0], dtype=torch.int64,
                            device=self.device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(max(1, int(size.item())), dtype=torch.uint8)
        if self.is_main and data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        dist.broadcast(buf, src=0)
        return buf[: int(size.item())].cpu().numpy().tobytes()

    def read_on_main(self, path: Path) -> bytes | None:
        """The file's bytes as rank 0 reads them, on every rank (None when it has no such file): checkpoints
        and ``--init`` weights need to exist only where rank 0 runs.  A read error is raised on every rank."""
        if not self.enabled:
            return path.read_bytes() if path.is_file() else None
        packed = None
        if self.is_main:
            try:
                packed = b"\x01" + path.read_bytes() if path.is_file() else b"\x00"
            except OSError as exc:
                packed = b"\x02" + str(exc).encode("utf-8", "replace")
        got = self.broadcast_bytes(packed)
        if got[:1] == b"\x02":
            raise OSError(f"rank 0 cannot read {path}: {got[1:].decode('utf-8', 'replace')}")
        return got[1:] if got[:1] == b"\x01" else None

    # -- training -----------------------------------------------------------------------------------------
    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (for reported losses)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (gradients averaged over the ranks in backward)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers (the input scale) are set identically on every rank and never trained: no sync per step
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Distributed()


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def from_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, NCCL when this rank has a GPU), or SINGLE.

    Each rank gets ``cores // ranks on this machine`` torch threads, so N ranks on one box share its cores
    instead of each starting one thread per core.
    """
    env = os.environ
    if not launched_by_torchrun(env):
        return SINGLE
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise ValueError(f"torchrun's environment is not understood ({exc})") from exc
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive, got {timeout_s:g}")
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    torch.set_num_threads(max(1, _cores() // max(1, local_world)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
    # one line per rank on stderr: which process is which rank (what an operator, or a test, needs to find it)
    print(f"weakrest-train: {info.describe()} joined (pid {os.getpid()}, {backend}, {device}, "
          f"{torch.get_num_threads()} torch threads)", file=sys.stderr, flush=True)
    return info
