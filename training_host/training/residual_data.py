"""Residual fields for training the Swin: the same retrieval + matching the edge runs, on training images.

Three kinds of field, all (h_f, w_f, d_f) float16 with int8 block labels (1 anomalous, 0 normal, -1 ignored):

- ``good``: a bank image matched against the bank with itself left out of the references, which is how a
  new good frame looks to the edge (its own patches are not in the bank);
- ``synthetic``: a synthetic anomaly pasted on a bank image (again leaving the source image out), labelled
  from its mask by paper Eq. 15;
- ``defect``: a real defective image with a pixel mask (supervised mode), matched like any test image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_runtime.core.bundle import sha256_of
from edge_runtime.core.pipeline import PosFARScorer
from edge_runtime.core.preprocess import ImageReadError, read_image, resize_rgb, to_input_tensor
from training_host.data.dataset import TestSample, load_mask, scan_dataset
from training_host.data.synthetic import (
    AnomalySynthesizer,
    block_labels,
    boundary_ignored,
    region_blocks,
    transplant_defect,
)
from training_host.labels.weak_labels import LabelSet, WeakLabel, block_labels_from_weak, box_blocks, weak_bags
from training_host.models.features import PatchFeatureExtractor, extract
from training_host.training.distributed import SINGLE, Distributed
from training_host.training.resmixmatch import UNKNOWN

#: a box's blocks in a defect bank: those the fine-tuned Swin is surer of than this many times its scale (its 0.999
#: quantile on held-out good blocks), at least the box's surest.  MTD, fast profile, boxes of ten defects, seeds 0 / 1
#: / 2, refitted: pixel AP +0.1 / +1.2 / +2.7 points over no bank, against +0.0 / +1.4 / +2.1 for the half of the box
#: blocks the Swin ranks highest; levels 0.8 to 1.2 within 0.8 point of each other, 1.5 keeps too few blocks.  Each
#: box's own blocks (thin and small boxes too, ``box_blocks``) rather than the union's: PRO +0.4 / +0.0 / +0.3 points
#: (docs/sweeps/defect_bank.md)
BOX_BANK_LEVEL = 1.0

log = logging.getLogger(__name__)


@dataclass
class ResidualSet:
    """Training fields for the residual classifier, with their block labels and kind."""

    fields: torch.Tensor  # (N, h, w, d_f) float16
    labels: torch.Tensor  # (N, h, w) int8
    kinds: list[str] = field(default_factory=list)
    # weak labels' bags (N, n_bags, h, w) uint8, k on a bag's blocks: "at least k of them are anomalous"
    bags: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.fields.shape[0])

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.kinds)

    def _indices(self, kind: str | None) -> list[int]:
        """The positions of the fields of ``kind`` (None: every field)."""
        return [i for i, k in enumerate(self.kinds) if kind is None or k == kind]

    def ignored_as_unknown(self) -> ResidualSet:
        """The same fields with their ignored blocks (-1: a mask covers them between eps_neg and eps_pos) made
        UNKNOWN, for ResMixMatch to guess: each connected group of them then holds at least one defect block."""
        labels = torch.where(self.labels == -1, torch.full_like(self.labels, UNKNOWN), self.labels)
        return ResidualSet(self.fields, labels, list(self.kinds), self.bags)

    def boundary_ignored(self, width: int, kind: str | None = None) -> ResidualSet:
        """The same fields (shared, not copied) with the normal blocks next to their anomalies ignored
        (:func:`boundary_ignored`): in every field, or in those of ``kind`` only."""
        if not width:
            return self
        labels = self.labels.clone()
        idx = self._indices(kind)
        if idx:
            labels[idx] = torch.from_numpy(boundary_ignored(self.labels[idx].numpy(), width))
        return ResidualSet(self.fields, labels, list(self.kinds), self.bags)

    def select(self, kind: str) -> ResidualSet:
        idx = self._indices(kind)
        bags = self.bags[idx] if self.bags is not None else None
        return ResidualSet(self.fields[idx], self.labels[idx], [kind] * len(idx), bags)

    @staticmethod
    def concat(sets: list[ResidualSet]) -> ResidualSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            raise ValueError("no residual fields to train on")
        bags = None
        if any(s.bags is not None for s in sets):  # fields without bags get none (all-zero padding)
            bags = stack_bags([b for s in sets for b in (s.bags if s.bags is not None else [None] * len(s))],
                              tuple(sets[0].labels.shape[1:]))
        return ResidualSet(torch.cat([s.fields for s in sets]), torch.cat([s.labels for s in sets]),
                           [k for s in sets for k in s.kinds], bags)


def stack_bags(per_field: list[np.ndarray | torch.Tensor | None], grid: tuple[int, int]) -> torch.Tensor:
    """One (N, n_bags, h, w) uint8 tensor from each field's bags (n_i, h, w) or None, padded with empty bags."""
    n_bags = max([1, *(len(b) for b in per_field if b is not None)])
    out = torch.zeros((len(per_field), n_bags, *grid), dtype=torch.uint8)
    for i, b in enumerate(per_field):
        if b is not None and len(b):
            out[i, : len(b)] = torch.as_tensor(b)
    return out


@dataclass(frozen=True)
class LabelledDefect:
    """A real defective image picked for supervision, with what identifies it in reports."""

    sample: TestSample
    name: str  # path relative to the dataset root
    sha256: str


class ResidualFieldMaker:
    """Turns RGB images (+ masks) into residual fields with the fitted bank, in backbone-sized batches
    (under torchrun each rank makes its share of the batches and every rank gets all fields, in order)."""

    def __init__(self, extractor: PatchFeatureExtractor, scorer: PosFARScorer, eps_pos: float, eps_neg: float,
                 batch_size: int = 16, min_positive_px: int = 0, dist: Distributed = SINGLE) -> None:
        self.extractor = extractor
        self.scorer = scorer
        self.grid = extractor.grid
        self.input_hw = extractor.input_hw
        self.eps_pos = eps_pos
        self.eps_neg = eps_neg
        self.min_positive_px = min_positive_px
        self.batch_size = batch_size
        self.dist = dist

    def make(self, images: list[np.ndarray], masks: list[np.ndarray | None], exclude: list[int | None],
             kind: str, progress: bool = False) -> ResidualSet:
        """images: RGB uint8 at the input size; masks: (H, W) defect masks or None (all normal)."""
        return self.make_lazy(len(images), lambda lo, hi: (images[lo:hi], masks[lo:hi]), exclude, kind, progress)

    def make_lazy(self, n: int, inputs: Callable[[int, int], tuple[list[np.ndarray], list[np.ndarray | None]]],
                  exclude: list[int | None], kind: str, progress: bool = False) -> ResidualSet:
        """As :meth:`make`, with ``inputs(lo, hi)`` giving items lo..hi-1 (images, masks) when their batch is
        made: under torchrun only the rank that makes a batch renders its images (synthetic anomalies)."""
        h, w = self.grid

        def compute(b: int):
            lo = b * self.batch_size
            images, masks = inputs(lo, min(n, lo + self.batch_size))
            fields = torch.empty((len(images), h, w, self.extractor.d_f), dtype=torch.float16)
            labels = torch.zeros((len(images), h, w), dtype=torch.int8)
            batch = np.concatenate([to_input_tensor(img, self.input_hw) for img in images])
            pcf, desc = extract(self.extractor, batch)
            for i in range(len(batch)):
                res = self.scorer.residual(pcf[i], desc[i], exclude=exclude[lo + i])
                fields[i] = torch.from_numpy(res.residual.reshape(h, w, -1))
                if masks[i] is not None:
                    labels[i] = torch.from_numpy(block_labels(masks[i], self.grid, self.eps_pos, self.eps_neg,
                                                              self.min_positive_px))
            return {"fields": fields.numpy(), "labels": labels.numpy()}, None

        fields = torch.empty((n, h, w, self.extractor.d_f), dtype=torch.float16)
        labels = torch.zeros((n, h, w), dtype=torch.int8)
        bar = tqdm(total=n, desc=f"{kind} residuals", unit="img", disable=not progress)
        n_batches = -(-n // self.batch_size)
        for b, (arrays, _) in enumerate(self.dist.map_batches(n_batches, compute)):
            lo = b * self.batch_size
            fields[lo : lo + len(arrays["fields"])] = torch.from_numpy(arrays["fields"])
            labels[lo : lo + len(arrays["labels"])] = torch.from_numpy(arrays["labels"])
            bar.update(len(arrays["fields"]))
        bar.close()
        return ResidualSet(fields, labels, [kind] * n)


def read_resized(paths: list[Path], size_hw: tuple[int, int]) -> tuple[list[np.ndarray], list[int], list[str]]:
    """RGB uint8 images at ``size_hw``; returns them, the positions that loaded and one line per failure."""
    images, ok, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(resize_rgb(read_image(path), size_hw))
            ok.append(i)
        except ImageReadError as exc:
            errors.append(str(exc))
    return images, ok, errors


def synthetic_fields(maker: ResidualFieldMaker, images: list[np.ndarray], per_image: int,
                     synthesizer: AnomalySynthesizer, foreground_maps: np.ndarray | None, seed: int,
                     progress: bool = False) -> tuple[ResidualSet, list[tuple[np.ndarray, np.ndarray]]]:
    """``per_image`` synthetic anomalies on every bank image (image j left out of its own references).

    Each image's anomalies come from a generator seeded by (seed, image index), so they are the same
    whichever rank renders them, and only when their batch is made.  Returns the fields and the first
    few (image, mask) pairs for a preview grid.
    """

    def anomalies_of(j: int) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([seed, j])
        fg = foreground_maps[j] if foreground_maps is not None else None
        return [synthesizer.make(images[j], foreground=fg, rng=rng) for _ in range(per_image)]

    def inputs(lo: int, hi: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        made: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        items = []
        for k in range(lo, hi):
            j, s = divmod(k, per_image)
            if j not in made:
                made[j] = anomalies_of(j)
            items.append(made[j][s])
        return [a for a, _ in items], [m for _, m in items]

    n = len(images) * per_image
    data = maker.make_lazy(n, inputs, [k // per_image for k in range(n)], "synthetic", progress)
    preview_images, preview_masks = inputs(0, min(16, n))
    return data, list(zip(preview_images, preview_masks, strict=True))


def pick_defects(source: Path, n: int, seed: int) -> list[LabelledDefect]:
    """The paper's protocol: ``n`` defective test images with pixel masks, drawn at random (seeded)."""
    dataset = scan_dataset(source)
    candidates = [s for s in dataset.test if s.is_defective and s.mask_path is not None and s.mask_path.is_file()]
    if len(candidates) < n:
        raise ValueError(f"{source}: asked for {n} defective images with masks, found {len(candidates)}")
    order = np.random.default_rng(seed).permutation(len(candidates))[:n]
    picked = [candidates[i] for i in sorted(order)]
    return [LabelledDefect(s, str(s.path.relative_to(dataset.root)), sha256_of(s.path)) for s in picked]


def _read_defects(defects: list[LabelledDefect], size_hw: tuple[int, int]
                  ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Images and masks of real defects at ``size_hw``; unreadable ones are reported and skipped."""
    images, masks, errors = [], [], []
    for d in defects:
        try:
            images.append(resize_rgb(read_image(d.sample.path), size_hw))
            masks.append(load_mask(d.sample, size_hw).astype(np.float32))
        except ImageReadError as exc:
            errors.append(str(exc))
    return images, masks, errors


def defect_fields(maker: ResidualFieldMaker, defects: list[LabelledDefect], bank_paths: list[Path] | None = None,
                  transplants: int = 0, seed: int = 0) -> tuple[ResidualSet, list[str]]:
    """Residual fields of real defects, labelled from their masks; unreadable ones are reported and skipped.

    With ``transplants`` > 0, each defect is also pasted (:func:`transplant_defect`) into that many good bank
    images drawn at random (seeded), each field left out of its own image's references as the synthetic ones are.
    """
    images, masks, errors = _read_defects(defects, maker.input_hw)
    real = maker.make(images, masks, [None] * len(images), "defect")
    if not transplants or not images or not bank_paths:
        return real, errors
    rng = np.random.default_rng([seed, 0x7A5])
    picks = rng.choice(len(bank_paths), size=len(images) * transplants, replace=len(images) * transplants
                       > len(bank_paths))
    targets, ok, failed = read_resized([bank_paths[int(j)] for j in picks], maker.input_hw)
    errors.extend(failed)
    pasted, pasted_masks, exclude = [], [], []
    for k, t in zip(ok, targets, strict=True):
        d = k // transplants
        image, mask = transplant_defect(images[d], masks[d], t, rng)
        pasted.append(image)
        pasted_masks.append(mask)
        exclude.append(int(picks[k]))
    moved = maker.make(pasted, pasted_masks, exclude, "defect")
    return ResidualSet.concat([real, moved]), errors




def mask_bank_blocks(mask: np.ndarray, grid: tuple[int, int], eps_pos: float, eps_neg: float,
                     min_positive_px: int = 0) -> np.ndarray:
    """Boolean (h, w) the blocks of one masked defect that go in a defect bank: its anomalous blocks (block labels
    1), and of each defect region, the blocks it covers more than ``eps_pos`` of, or for a region too thin or small to
    cover any block that much, those it covers at least half as much as its best-covered one (``region_blocks``), so
    a hairline crack or a pit still gives rows.  One place for the fit and the study."""
    return (block_labels(mask, grid, eps_pos, eps_neg, min_positive_px) == 1) | region_blocks(mask, grid, eps_pos)


def defect_block_features(extractor: PatchFeatureExtractor, defects: list[LabelledDefect], eps_pos: float,
                          eps_neg: float, min_positive_px: int = 0) -> tuple[np.ndarray, int]:
    """The patch features (n, d_f) of the real defects' blocks (:func:`mask_bank_blocks`): a defect bank's rows
    (``edge_runtime.core.defect_bank``), and how many images gave at least one."""
    images, masks, _ = _read_defects(defects, extractor.input_hw)
    rows, used = [], 0
    for image, mask in zip(images, masks, strict=True):
        pcf = extract(extractor, to_input_tensor(image, extractor.input_hw))[0][0]
        chosen = mask_bank_blocks(mask, extractor.grid, eps_pos, eps_neg, min_positive_px).ravel()
        used += bool(chosen.any())
        rows.append(np.asarray(pcf, np.float32)[chosen])
    return _stacked(rows, extractor.d_f), used


def _stacked(rows: list[np.ndarray], d_f: int) -> np.ndarray:
    """Each image's chosen rows as one (n, d_f) float32 array (empty without images)."""
    return np.concatenate(rows) if rows else np.zeros((0, d_f), np.float32)


def sure_blocks(probability: np.ndarray, inside: np.ndarray, level: float) -> np.ndarray:
    """Of the ``inside`` blocks (a boolean mask), those whose Swin ``probability`` is at least ``level``; the surest
    one when none is, so a faint defect still gives a row.  The boxes' rule of a defect bank."""
    candidates = np.where(inside, probability, -np.inf)
    sure = candidates >= level
    return sure if sure.any() or not inside.any() else candidates == candidates.max()


def labelled_bank_blocks(label: WeakLabel, image_hw: tuple[int, int], grid: tuple[int, int],
                         probability: np.ndarray | None, level: float) -> np.ndarray:
    """Boolean (h * w,) the blocks of one weakly labelled image that go in a defect bank: explicit anomalous blocks,
    or of each box's own blocks (``box_blocks``) those whose Swin ``probability`` (h * w,) is at least ``level``, at
    least the box's surest (:func:`sure_blocks`).  One place for the fit and the study."""
    if label.blocks is not None:
        return block_labels_from_weak(label, image_hw, grid).ravel() == 1
    chosen = np.zeros(int(np.prod(grid)), bool)
    for inside in box_blocks(label, image_hw, grid):
        chosen |= sure_blocks(probability, inside.ravel(), level)
    return chosen


def box_block_features(extractor: PatchFeatureExtractor, scorer: PosFARScorer, labels: LabelSet, root: Path,
                       level: float) -> tuple[np.ndarray, int]:
    """A defect bank's rows from weak labels: of each box's own blocks (those it covers more than half, or for a box
    too thin or small for that, those it covers at least half as much as its best-covered one), the ones whose
    fine-tuned Swin (``scorer``'s classifier) probability is at least ``level``, at least its surest; and explicit
    anomalous blocks (:func:`labelled_bank_blocks`).  Tags give none (a whole image's guess
    put normal features in the bank: docs/sweeps/defect_bank.md).  Unreadable images are skipped (``weak_fields``
    reports them)."""
    rows, used = [], 0
    for key, label in sorted(labels.images.items()):
        if not label.boxes and not label.rotated_boxes and label.blocks is None:
            continue
        try:
            image = read_image(root / key)
        except ImageReadError:
            continue
        pcf, descriptor = (a[0] for a in extract(extractor, to_input_tensor(resize_rgb(image, extractor.input_hw),
                                                                            extractor.input_hw)))
        probability = None if label.blocks is not None else scorer.evidence(pcf, descriptor).probability
        chosen = labelled_bank_blocks(label, image.shape[:2], extractor.grid, probability, level)
        used += bool(chosen.any())
        rows.append(np.asarray(pcf, np.float32)[chosen])
    return _stacked(rows, extractor.d_f), used


def weak_fields(maker: ResidualFieldMaker, labels: LabelSet, root: Path, box_overlap: float, box_lines: bool = True,
                tag_top_k: int = 1) -> tuple[ResidualSet, list[LabelledDefect], list[str]]:
    """Residual fields of weakly labelled images with their block labels (0 normal, UNKNOWN, 1 anomalous
    only from explicit blocks), as the paper's §III-D1 conversion gives them, and their bags
    (:func:`~training_host.labels.weak_labels.weak_bags`).  Unreadable images are reported and skipped."""
    images, block_maps, bag_maps, used, errors = [], [], [], [], []
    for key, label in sorted(labels.images.items()):
        path = root / key
        try:
            image = read_image(path)
        except ImageReadError as exc:
            errors.append(str(exc))
            continue
        block_maps.append(block_labels_from_weak(label, image.shape[:2], maker.grid, box_overlap))
        bag_maps.append(weak_bags(label, image.shape[:2], maker.grid, box_lines, tag_top_k))
        images.append(resize_rgb(image, maker.input_hw))
        used.append(LabelledDefect(TestSample(path, path.parent.name, None), key, sha256_of(path)))
    data = maker.make(images, [None] * len(images), [None] * len(images), "weak")
    if len(data):  # -1 (unknown in a label file) becomes UNKNOWN: -1 means "ignored" in training labels
        maps = np.stack(block_maps).astype(np.int8)
        data.labels = torch.from_numpy(np.where(maps == -1, UNKNOWN, maps).astype(np.int8))
        data.bags = stack_bags(bag_maps, maker.grid)
    return data, used, errors
