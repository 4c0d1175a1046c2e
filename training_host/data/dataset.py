"""MVTec-layout datasets: ``train/good``, ``test/<type>``, ``ground_truth/<type>/<name>_mask.png``.

Any image size, grey or colour.  A dataset may hold only a train or only a test split.  Unreadable
images are reported by name and skipped; they never end a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.core.preprocess import ImageReadError, list_images, read_image, to_input_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TestSample:
    path: Path
    defect_type: str  # "good" for defect-free
    mask_path: Path | None

    @property
    def is_defective(self) -> bool:
        return self.defect_type != "good"


@dataclass
class Dataset:
    root: Path
    train: list[Path]
    test: list[TestSample]


def scan_dataset(root: str | Path) -> Dataset:
    """Index a dataset folder; raise FileNotFoundError if it has neither split."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    train = list_images(root / "train" / "good")
    test: list[TestSample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for img in list_images(type_dir):
                mask = None
                if type_dir.name != "good":
                    mask = root / "ground_truth" / type_dir.name / f"{img.stem}_mask.png"
                test.append(TestSample(img, type_dir.name, mask))
    if not train and not test:
        raise FileNotFoundError(f"{root}: no images in train/good or test/<type> (MVTec layout expected)")
    return Dataset(root=root, train=train, test=test)


def link_images(src: Path, dst: Path, n: int) -> Path:
    """``n`` evenly spaced images of the folder ``src`` as symbolic links in ``dst`` (nothing is copied; links
    left in ``dst`` by an earlier call are replaced).  Raises ValueError when ``src`` has fewer."""
    images = list_images(src)
    if len(images) < n:
        raise ValueError(f"{src}: {len(images)} images, fewer than {n}")
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():
        if old.is_symlink():
            old.unlink()
    for i in range(n):
        p = images[int(i * len(images) / n)]
        (dst / p.name).symlink_to(p.resolve())
    return dst


def subset_dataset(src: Path, dst: Path, n_train: int) -> Path:
    """A dataset in ``dst`` with ``n_train`` evenly spaced training images of ``src`` and the whole test split
    (links): a quicker fit on the same test images."""
    link_images(src / "train" / "good", dst / "train" / "good", n_train)
    for split in ("test", "ground_truth"):
        link = dst / split
        if (src / split).is_dir() and not link.exists():
            link.symlink_to((src / split).resolve())
    return dst


def load_batch(paths: list[Path], size_hw: tuple[int, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Decode and resize images to a float32 (B, 3, H, W) batch in [0, 1].

    Returns the batch, the positions in ``paths`` that loaded, and one error line per failed file.
    """
    tensors, ok, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            tensors.append(to_input_tensor(read_image(path), size_hw)[0])
            ok.append(i)
        except ImageReadError as exc:
            errors.append(str(exc))
            log.warning("skipping %s", exc)
    batch = np.stack(tensors) if tensors else np.zeros((0, 3, *size_hw), np.float32)
    return batch, ok, errors


def load_mask(sample: TestSample, size_hw: tuple[int, int]) -> np.ndarray:
    """Boolean mask at ``size_hw``; all False for good images; ImageReadError if a defect mask is bad."""
    if not sample.is_defective:
        return np.zeros(size_hw, dtype=bool)
    if sample.mask_path is None or not sample.mask_path.is_file():
        raise ImageReadError(f"{sample.path}: ground-truth mask {sample.mask_path} is missing")
    mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ImageReadError(f"{sample.mask_path}: not a readable mask")
    mask = cv2.resize(mask, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 127
