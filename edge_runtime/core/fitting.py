"""Fitting the PosFAR state (bank, PCA, reference descriptors) from a stream of patch features.

Torch-free, so the training host (features from torch) and the field calibration tool (features from
the bundle's ONNX backbone) build bundles with exactly the same code.  Images arrive in batches; the
per-image coreset is taken on arrival, so memory holds only the selected ~10 % of patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coreset import select_per_image
from .foreground import ForegroundBuilder
from .matching import MemoryBank
from .pca import PCA, fit_pca
from .pipeline import Classifier, ForegroundWeighting, MapFusion, PosFARScorer
from .retrieval import ReferenceIndex


@dataclass
class FittedPosFAR:
    bank: np.ndarray  # (n_bank, d_f) float32
    bank_image: np.ndarray  # (n_bank,) int32
    pca: PCA
    descriptors: np.ndarray  # (n_images, cells, C) float32
    foreground_maps: np.ndarray | None = None  # (n_images, h_f, w_f) float32 in [0, 1], object products only

    def scorer(self, k: int, grid: tuple[int, int], input_hw: tuple[int, int], retrieval_trim: float,
               blur_sigma: float, score_pool: int, thetas: tuple[float, ...], classifier: Classifier | None = None,
               foreground_power: float = 0.0, foreground_pool: int = 3,
               fusion: MapFusion | None = None, image_score: str = "map") -> PosFARScorer:
        """Score held-out images against this state exactly as the edge will against the bundle."""
        foreground = None
        if self.foreground_maps is not None and foreground_power > 0:
            # the edge reads the maps back from fp16: score with the same values
            foreground = ForegroundWeighting(self.foreground_maps.astype(np.float16), foreground_power,
                                             foreground_pool)
        return PosFARScorer(MemoryBank(self.bank, self.bank_image, self.pca),
                            ReferenceIndex(self.descriptors, retrieval_trim), k, grid, input_hw, blur_sigma, score_pool,
                            thetas=tuple(thetas), classifier=classifier, foreground=foreground, fusion=fusion,
                            image_score=image_score)

    def arrays(self) -> dict[str, np.ndarray]:
        """The bundle's arrays, in the dtypes of the bundle contract (fp16 bank and descriptors)."""
        arrays = {
            "bank": self.bank.astype(np.float16),
            "bank_image": self.bank_image.astype(np.int32),
            "pca_components": self.pca.components.astype(np.float32),
            "pca_mean": self.pca.mean.astype(np.float32),
            "ref_descriptors": self.descriptors.astype(np.float16),
        }
        if self.foreground_maps is not None:
            arrays["foreground_maps"] = self.foreground_maps.astype(np.float16)
        return arrays


class BankBuilder:
    """Accumulates coreset patches and descriptors image by image, then fits the PCA.

    With a :class:`ForegroundBuilder` it also feeds each image's coreset choice to the foreground LDA,
    which needs exactly that (frequently selected positions are the object).
    """

    def __init__(self, coreset_ratio: float, projection_dim: int = 128, seed: int = 0,
                 foreground: ForegroundBuilder | None = None) -> None:
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.foreground = foreground
        self._bank: list[np.ndarray] = []
        self._image: list[np.ndarray] = []
        self._descriptors: list[np.ndarray] = []
        self.n_images = 0

    def add(self, pcf: np.ndarray, descriptors: np.ndarray) -> None:
        """pcf: (B, M, d_f) patch features of B images; descriptors: (B, cells, C)."""
        if pcf.shape[0] != descriptors.shape[0]:
            raise ValueError("pcf and descriptors must hold the same images")
        if pcf.shape[0] == 0:
            return
        chosen = select_per_image(pcf, self.coreset_ratio, self.projection_dim, seed=self.seed + self.n_images)
        rows = np.arange(pcf.shape[0])[:, None]
        self._bank.append(np.asarray(pcf[rows, chosen], dtype=np.float32).reshape(-1, pcf.shape[2]))
        ids = np.repeat(np.arange(self.n_images, self.n_images + pcf.shape[0]), chosen.shape[1])
        self._image.append(ids.astype(np.int32))
        self._descriptors.append(np.asarray(descriptors, dtype=np.float32))
        if self.foreground is not None:
            self.foreground.add(pcf, chosen)
        self.n_images += pcf.shape[0]

    def build(self, d_l: int | None = None, pca_variance: float = 0.95) -> FittedPosFAR:
        if self.n_images < 2:
            raise ValueError(f"need at least 2 good images to build a bank, got {self.n_images}")
        bank = np.concatenate(self._bank)
        pca = fit_pca(bank, n_components=d_l, variance=pca_variance)
        maps = self.foreground.finish()[1] if self.foreground is not None else None
        return FittedPosFAR(bank=bank, bank_image=np.concatenate(self._image), pca=pca,
                            descriptors=np.concatenate(self._descriptors), foreground_maps=maps)


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of good images into bank images and threshold hold-outs (both sorted)."""
    n_holdout = int(round(len(items) * fraction))
    if len(items) - n_holdout < 2 or n_holdout < 1:
        raise ValueError(f"need at least 3 good images (2 for the bank, 1 held out), got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    holdout = sorted(items[i] for i in order[:n_holdout])
    bank = sorted(items[i] for i in order[n_holdout:])
    return bank, holdout
