"""Training loop of the residual Swin: focal loss, masked/jittered tokens, AdamW, EMA, checkpoints, resume.

One :class:`SwinTrainer` runs named phases (``unsupervised``, then ``supervised`` fine-tuning).  Each phase
checkpoints to ``<dir>/<phase>.safetensors`` (model, EMA and optimiser tensors) plus ``<phase>.json``
(step, losses, architecture); nothing is pickled.  Batches are drawn from a generator seeded by the step,
so a resumed run draws the same batches it would have drawn without the interruption.

Under torchrun the model trains under DistributedDataParallel: every rank draws the same global batch of
the step (so a run resumes the same whatever the number of processes, and checkpoints move between
them), trains on its interleaved share of it (``swin.batch_size / world_size`` fields) and DDP averages
the gradients, so all ranks take the same optimiser step.  This is DistributedSampler's partition done
per step: the trainer samples with replacement by step, not by epoch.  Rank 0 writes the checkpoints;
on resume it reads them and sends them to the others (no shared filesystem needed).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from training_host.config import SwinConfig
from training_host.errors import CheckpointError  # noqa: F401  (raised here; importable without torch)
from training_host.models.swin import ResidualSwin, focal_loss, mask_and_jitter, region_balanced_weights
from training_host.training.distributed import SINGLE, Distributed
from training_host.training.residual_data import ResidualSet

log = logging.getLogger(__name__)


@dataclass
class PhaseReport:
    phase: str
    steps: int
    seconds: float
    resumed_at: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last entry)

    def to_json(self) -> dict:
        return asdict(self)


class Objective(Protocol):
    """Loss of one training step: model, clean batch (B, h, w, d_f), labels (B, h, w), crop offset, step, rng, and
    the weak labels' bags (B, n_bags, h, w) when the batch holds weakly labelled fields."""

    def __call__(self, model: ResidualSwin, x: torch.Tensor, y: torch.Tensor, offset: tuple[int, int], step: int,
                 gen: torch.Generator, bags: torch.Tensor | None = None) -> torch.Tensor: ...


class FocalObjective:
    """Hard block labels (1, 0, -1 ignored): focal loss on masked and jittered residual tokens (Eq. 18), its
    anomalous blocks weighed by the size of their region when ``swin.region_balance`` is set."""

    def __init__(self, cfg: SwinConfig) -> None:
        self.cfg = cfg

    def __call__(self, model: ResidualSwin, x: torch.Tensor, y: torch.Tensor, offset: tuple[int, int], step: int,
                 gen: torch.Generator, bags: torch.Tensor | None = None) -> torch.Tensor:
        x = mask_and_jitter(x, self.cfg.mask_ratio, self.cfg.jitter, gen)
        balance = self.cfg.region_balance
        weight = region_balanced_weights(y, balance) if balance else None
        return focal_loss(model.logits(x, offset), y, self.cfg.focal_alpha, self.cfg.focal_gamma, weight)


class _Logits(torch.nn.Module):
    """``model.logits`` as a module's forward, which is what DDP hooks into."""

    def __init__(self, model: ResidualSwin) -> None:
        super().__init__()
        self.model = model

    def forward(self, field: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return self.model.logits(field, offset)


class _Synced:
    """What an objective sees under DDP: ``logits`` runs through DDP (gradients averaged over the ranks in
    backward); everything else is the model's own."""

    def __init__(self, ddp: torch.nn.Module, model: ResidualSwin) -> None:
        self._ddp = ddp
        self._model = model

    def logits(self, field: torch.Tensor, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return self._ddp(field, offset)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the base rate."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class SwinTrainer:
    """Trains a :class:`ResidualSwin` in phases; keeps an EMA copy, which is what gets exported."""

    def __init__(self, model: ResidualSwin, cfg: SwinConfig, checkpoint_dir: Path | None = None, seed: int = 0,
                 resume: bool = False, dist: Distributed = SINGLE) -> None:
        self.dist = dist
        self.model = model.to(dist.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.cfg = cfg
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.seed = seed
        self.resume = resume
        # one DDP wrapper for all phases (each wrapper hooks the parameters); the objective gets the proxy
        self._trained = _Synced(dist.wrap(_Logits(self.model)), self.model) if dist.enabled else self.model

    # -- checkpoints -------------------------------------------------------------------------------------
    def _paths(self, phase: str) -> tuple[Path, Path]:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / f"{phase}.safetensors", self.checkpoint_dir / f"{phase}.json"

    def _save(self, phase: str, step: int, total: int, optimizer: torch.optim.Optimizer,
              report: PhaseReport) -> None:
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        from safetensors.torch import save_file

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()})
        for i, state in optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        weights, meta = self._paths(phase)
        tmp_w, tmp_m = weights.with_suffix(".safetensors.tmp"), meta.with_suffix(".json.tmp")
        save_file(tensors, str(tmp_w))
        tmp_m.write_text(json.dumps({
            "phase": phase, "step": step, "total_steps": total, "shape": asdict(self.model.shape),
            "report": report.to_json(),
        }, indent=1))
        tmp_w.replace(weights)
        tmp_m.replace(meta)

    def _load(self, phase: str, optimizer: torch.optim.Optimizer | None) -> dict | None:
        """Restore a phase's checkpoint if there is one; returns its JSON (None when there is none)."""
        if self.checkpoint_dir is None:
            return None
        weights, meta_path = self._paths(phase)
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:  # rank 0 reads, every rank gets the bytes
            meta_bytes = self.dist.read_on_main(meta_path)
            weight_bytes = self.dist.read_on_main(weights)
            if meta_bytes is None or weight_bytes is None:
                return None
            meta = json.loads(meta_bytes)
            tensors = load(weight_bytes)  # load_state_dict puts each on its device
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"{weights}: cannot read the checkpoint ({exc})") from exc
        shape = json.loads(json.dumps(asdict(self.model.shape)))  # tuples as JSON lists, as saved
        if meta.get("shape") != shape:
            raise CheckpointError(f"{meta_path}: checkpoint is for {meta.get('shape')}, this model is {shape}")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if optimizer is not None:
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    state.setdefault(int(idx), {})[name] = value
            sd = optimizer.state_dict()
            sd["state"] = state
            optimizer.load_state_dict(sd)
        return meta

    # -- training ----------------------------------------------------------------------------------------
    def _batch(self, data: ResidualSet, defects: ResidualSet | None, step: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int], torch.Generator]:
        """A clean batch (no masking/jitter yet), its bags (None without weak labels) and the step's generator,
        which the objective goes on using."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        bs = self.cfg.batch_size
        n_def = 0
        if defects is not None and len(defects):
            n_def = min(bs - 1, max(1, round(bs * self.cfg.defect_fraction)))
        idx = torch.randint(len(data), (bs - n_def,), generator=gen)  # the global batch, the same on every rank
        x, y = data.fields[idx].float(), data.labels[idx]
        bags = None
        if n_def:
            didx = torch.randint(len(defects), (n_def,), generator=gen)
            x = torch.cat([x, defects.fields[didx].float()])
            y = torch.cat([y, defects.labels[didx]])
            if defects.bags is not None:
                bags = torch.zeros((bs, *defects.bags.shape[1:]), dtype=torch.uint8)
                bags[bs - n_def :] = defects.bags[didx]
        x, y, bags, offset = self._crop_flip(x, y, bags, gen)
        d = self.dist
        if d.enabled:  # this rank's interleaved share; its own masking / jitter noise from here on
            x, y = x[d.rank :: d.world_size], y[d.rank :: d.world_size]
            bags = bags[d.rank :: d.world_size] if bags is not None else None
            gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)) + d.rank)
            x, y = x.to(d.device), y.to(d.device)
            bags = bags.to(d.device) if bags is not None else None
        return x, y, bags, offset, gen

    def _crop_flip(self, x: torch.Tensor, y: torch.Tensor, bags: torch.Tensor | None, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """A random train_window crop (when the grid is larger), the same for the whole batch, and random flips
        unless the model has an absolute position embedding (a flipped border would sit at the wrong place)."""
        win = self.model.shape.train_window
        h, w = x.shape[1:3]
        top = left = 0
        if h > win or w > win:
            top = int(torch.randint(max(1, h - win + 1), (1,), generator=gen))
            left = int(torch.randint(max(1, w - win + 1), (1,), generator=gen))
            x, y = x[:, top : top + win, left : left + win], y[:, top : top + win, left : left + win]
            if bags is not None:  # a bag the crop cuts may have lost its defect: it no longer holds
                whole = (bags > 0).sum((2, 3))
                bags = bags[:, :, top : top + win, left : left + win]
                bags = bags * ((bags > 0).sum((2, 3)) == whole)[..., None, None].to(bags.dtype)
        flips = torch.rand(2, generator=gen)
        if self.model.pos_embed is None:
            if flips[0] < 0.5:
                x, y = x.flip(1), y.flip(1)
                bags = bags.flip(2) if bags is not None else None
            if flips[1] < 0.5:
                x, y = x.flip(2), y.flip(2)
                bags = bags.flip(3) if bags is not None else None
        return x, y, bags, (top, left)

    def run_phase(self, phase: str, data: ResidualSet, steps: int, lr: float, defects: ResidualSet | None = None,
                  progress: bool = True, objective: Objective | None = None) -> PhaseReport:
        """Train ``steps`` steps (resuming from this phase's checkpoint when asked); the EMA is the result.

        ``objective`` turns a clean batch into a loss; the default is the focal loss on masked and jittered
        tokens with hard block labels (unsupervised and supervised modes).
        """
        cfg = self.cfg
        objective = objective or FocalObjective(cfg)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        report = PhaseReport(phase=phase, steps=steps, seconds=0.0)
        start = 0
        if self.resume:
            meta = self._load(phase, optimizer)
            if meta is not None:
                start = int(meta["step"])
                report = PhaseReport(**{**meta["report"], "losses": [tuple(x) for x in meta["report"]["losses"]]})
                report.resumed_at = start
                log.info("resuming phase %s at step %d of %d", phase, start, steps)
        self.model.train()
        t0 = time.perf_counter() - report.seconds
        running, count = 0.0, 0
        bar = tqdm(total=steps, initial=start, desc=f"swin {phase}", unit="step", disable=not progress)
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr, min(cfg.warmup_steps, steps // 5))
            x, y, bags, offset, gen = self._batch(data, defects, step)
            loss = objective(self._trained, x, y, offset, step, gen, bags=bags)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            optimizer.step()
            _ema_update(self.ema, self.model, min(cfg.ema, (1.0 + step) / (10.0 + step)))
            running += loss.item()
            count += 1
            done = step + 1
            if done % 50 == 0 or done == steps:
                report.losses.append((done, self.dist.mean(running / count)))
                bar.set_postfix(loss=f"{running / count:.4f}")
                running, count = 0.0, 0
            if done % cfg.checkpoint_every == 0 or done == steps:
                report.seconds = time.perf_counter() - t0
                self._save(phase, done, steps, optimizer, report)
            bar.update(1)
        bar.close()
        report.seconds = round(time.perf_counter() - t0, 2)
        self.model.eval()
        return report

    def load_weights(self, path: Path) -> None:
        """Start from another run's checkpoint (``--init``): its EMA weights become model and EMA."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:  # rank 0 reads, every rank gets the bytes
            raw = self.dist.read_on_main(Path(path))
            if raw is None:
                raise OSError("no such file")
            tensors = load(raw)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from exc
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        try:
            self.model.load_state_dict(ema)
            self.ema.load_state_dict(ema)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from exc
