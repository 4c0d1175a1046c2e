"""ResMixMatch (paper Algorithm 1): learning block anomaly from weak labels on residual fields.

Weak labels leave some blocks *unknown* (:data:`UNKNOWN` in the training labels): the blocks inside a
box, every block of a tagged image.  Known blocks (normal outside boxes, and all blocks of good and
synthetic fields) keep hard targets; blocks labelled -1 (the ignored band around a synthetic mask) add
nothing; unknown blocks get a guessed target:

1. A augmented copies of the batch (token masking and jitter, Eq. 18) are classified; the anomaly
   probabilities of each unknown block are averaged over the copies and sharpened with temperature T; with
   ``region_prior`` the label's multiple-instance bags are enforced: the most anomalous-looking block of
   every bag (each line across a tight box, the top-k blocks of a tagged image; see
   :func:`~training_host.labels.weak_labels.weak_bags`) is guessed anomalous outright, because the label
   says the bag holds a defect.  Without bags, each connected unknown region is one bag;
2. the batch (one augmented copy) and its targets are mixed with a shuffled copy of itself (MixUp,
   lambda ~ Beta(a, a), kept >= 0.5 so each mixed field stays closest to its own labels);
3. loss = [sum focal(known blocks; alpha_x, gamma_x) + lambda_u(step) * sum focal(unknown blocks; alpha_u,
   gamma_u)] / number of blocks, with soft targets, lambda_u ramped linearly to its final value over the
   first ``rampup_steps`` steps.

The samples of Algorithm 1 are blocks here, so both terms are sums over blocks divided by the same count:
lambda_u is the weight of one unknown block relative to one known block.  (Dividing each term by its own
count, as MixMatch does for images, let a few hundred guessed blocks outweigh the 16k known ones of a batch
lambda_u-fold, and on MTD the model drifted below its unsupervised start: pixel AP 0.253 against 0.299.)
``mixup_alpha = 0`` turns MixUp off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from training_host.models.swin import ResidualSwin, mask_and_jitter, soft_focal_loss

UNKNOWN = -2  # training label of a block a weak label leaves open (-1 stays "ignored", as in focal training)


@dataclass(frozen=True)
class ResMixMatchConfig:
    augmentations: int = 2  # A
    temperature: float = 0.5  # T
    mixup_alpha: float = 0.75
    alpha_x: float = 0.25
    alpha_u: float = 0.75
    gamma_x: float = 4.0
    gamma_u: float = 4.0
    lambda_u: float = 5.0
    rampup_steps: int = 400
    mask_ratio: float = 0.1
    jitter: float = 0.1
    region_prior: bool = True
    peak_from: str = "model"  # "model" | "model+residual": what picks the peak of a bag
    guess_rest: bool = True  # False: unknown blocks that are no bag's peak are left out of the loss


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Two-class sharpening of anomaly probabilities: p^(1/T) / (p^(1/T) + (1-p)^(1/T))."""
    a = p.clamp(1e-6, 1 - 1e-6).pow(1.0 / temperature)
    b = (1.0 - p).clamp(1e-6, 1 - 1e-6).pow(1.0 / temperature)
    return a / (a + b)


class ResMixMatch:
    """The weak-label objective for :class:`~training_host.training.train_swin.SwinTrainer`."""

    def __init__(self, cfg: ResMixMatchConfig) -> None:
        if cfg.augmentations < 1:
            raise ValueError(f"augmentations must be >= 1, got {cfg.augmentations}")
        if cfg.peak_from not in ("model", "model+residual"):
            raise ValueError(f"peak_from must be 'model' or 'model+residual', got {cfg.peak_from!r}")
        self.cfg = cfg

    def lambda_u(self, step: int) -> float:
        if self.cfg.rampup_steps <= 0:
            return self.cfg.lambda_u
        return self.cfg.lambda_u * min(1.0, step / self.cfg.rampup_steps)

    @torch.no_grad()
    def guess(self, model: ResidualSwin, x: torch.Tensor, y: torch.Tensor, offset: tuple[int, int],
              gen: torch.Generator, bags: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One augmented copy of the batch, the sharpened average anomaly probability over A copies with the peak
        of every bag (B, n_bags, h, w) set to 1 under ``region_prior``, and the mask of those peaks."""
        cfg = self.cfg
        copies = [mask_and_jitter(x, cfg.mask_ratio, cfg.jitter, gen) for _ in range(cfg.augmentations)]
        was_training = model.training
        model.eval()
        probs = torch.stack([model.logits(c, offset).softmax(-1)[..., 1] for c in copies]).mean(0)
        model.train(was_training)
        guessed = sharpen(probs, cfg.temperature)
        peaks = torch.zeros_like(guessed, dtype=torch.bool)
        if cfg.region_prior:
            if bags is None:
                bags = unknown_regions(y == UNKNOWN)
            peak = probs
            if cfg.peak_from == "model+residual":  # each relative to its bag's maximum, so both weigh alike
                magnitude = torch.linalg.vector_norm(x.float(), dim=-1)
                peak = _relative_in_bags(probs, bags) + _relative_in_bags(magnitude, bags)
            peaks = bag_peaks_anomalous(peak, torch.zeros_like(guessed), bags) > 0
            guessed = torch.where(peaks, torch.ones_like(guessed), guessed)
        return copies[0], guessed, peaks

    def __call__(self, model: ResidualSwin, x: torch.Tensor, y: torch.Tensor, offset: tuple[int, int], step: int,
                 gen: torch.Generator, bags: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        augmented, guessed, peaks = self.guess(model, x, y, offset, gen, bags)
        known, unknown = y >= 0, y == UNKNOWN
        if not cfg.guess_rest:
            unknown = unknown & peaks
        targets = torch.where(known, y.clamp_min(0).to(guessed.dtype), guessed)
        mixed_x, mixed_t = augmented, targets
        if cfg.mixup_alpha > 0:
            lam = _beta(cfg.mixup_alpha, gen)
            lam = max(lam, 1.0 - lam)
            perm = torch.randperm(x.shape[0], generator=gen)
            mixed_x = lam * augmented + (1.0 - lam) * augmented[perm]
            mixed_t = lam * targets + (1.0 - lam) * targets[perm]
        logits = model.logits(mixed_x, offset)
        n_known, n_unknown = float(known.sum()), float(unknown.sum())
        total = max(n_known + n_unknown, 1.0)
        loss_x = soft_focal_loss(logits, mixed_t, known.float(), cfg.alpha_x, cfg.gamma_x) * (n_known / total)
        loss_u = soft_focal_loss(logits, mixed_t, unknown.float(), cfg.alpha_u, cfg.gamma_u) * (n_unknown / total)
        return loss_x + self.lambda_u(step) * loss_u


def unknown_regions(unknown: torch.Tensor) -> torch.Tensor:
    """Bags (B, n, h, w) uint8 of 1s: each 8-connected unknown region of each field, the multiple-instance view of
    a label without finer structure (a region holds at least one defect block)."""
    mask = unknown.cpu().numpy()
    per_field = []
    for field_mask in mask:
        regions, n = ndimage.label(field_mask, structure=np.ones((3, 3), bool))
        per_field.append([regions == r for r in range(1, n + 1)])
    n_bags = max(1, max(len(b) for b in per_field))
    bags = np.zeros((len(mask), n_bags, *mask.shape[1:]), np.uint8)
    for i, field_bags in enumerate(per_field):
        for b, region in enumerate(field_bags):
            bags[i, b][region] = 1
    return torch.from_numpy(bags).to(unknown.device)


def _relative_in_bags(values: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """(B, n, h, w): ``values`` (B, h, w) divided by their maximum over each bag's blocks."""
    inside = bags > 0
    v = values[:, None].expand(inside.shape)
    top = torch.where(inside, v, torch.zeros_like(v)).amax((2, 3), keepdim=True)
    return v / top.clamp_min(1e-12)


def bag_peaks_anomalous(scores: torch.Tensor, guessed: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """``guessed`` (B, h, w) with the k highest-scoring blocks of every bag set to 1.

    ``bags`` (B, n, h, w) holds k on a bag's blocks ("at least k of them are anomalous"), 0 elsewhere; ``scores``
    is (B, h, w), or (B, n, h, w) to rank each bag's blocks its own way.  Only the peaks are lifted: lifting a
    whole box labelled its every block anomalous while the model could not yet tell them apart."""
    flat_bags = bags.flatten(2).to(torch.int64)  # (B, n, hw)
    k = flat_bags.amax(2)  # (B, n); 0 = no bag
    if not bool((k > 0).any()):
        return guessed
    flat_scores = scores.flatten(2) if scores.dim() == 4 else scores.flatten(1)[:, None, :].expand(flat_bags.shape)
    ranked = torch.where(flat_bags > 0, flat_scores, torch.full_like(flat_scores, -torch.inf))
    k_max = int(k.max())
    top = ranked.topk(k_max, dim=2)
    keep = (torch.arange(k_max, device=k.device) < k[..., None]) & torch.isfinite(top.values)
    out = guessed.clone().flatten(1)
    rows = torch.arange(len(out), device=out.device)[:, None, None].expand_as(top.indices)
    out[rows[keep], top.indices[keep]] = 1.0
    return out.view_as(guessed)


def _beta(alpha: float, gen: torch.Generator) -> float:
    """Beta(alpha, alpha) by Johnk's method on the step's generator (torch.distributions takes no generator),
    so that a resumed run mixes exactly as the uninterrupted one would."""
    for _ in range(1000):
        u, v = torch.rand(2, generator=gen).tolist()
        x, y = u ** (1.0 / alpha), v ** (1.0 / alpha)
        if 0.0 < x + y <= 1.0:
            return x / (x + y)
    return 0.5
