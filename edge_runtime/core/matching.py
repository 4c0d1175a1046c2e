"""Nearest-normal-patch matching and PosFAR residuals (paper steps 6-7).

The bank holds position-constrained features (PCFs) of coreset patches, sorted by the training image
they came from.  A test patch is matched only against the patches of its K retrieved reference images,
and the search runs in PCA space (d_l dims) while the residual and the distance are taken in the full
feature space against the matched entry.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import cv2
import numpy as np

from .pca import PCA

_CHUNK = 8192  # bank rows projected at a time at load: no float32 copy of the whole bank, even transiently
#: test patches scored against the candidates at a time: a (256, R) block of scores stays in the core's cache
#: between the product that writes it and the argmax that reads it (measured on MTD's bundle, 2 threads: 0.76 ms
#: per frame against 1.0 ms for one (M, R) product and 1.5 ms for the distance form |c|^2 - 2 q.c)
QUERY_CHUNK = 256


def _opencv_widens_float16() -> bool:
    """Whether this OpenCV does arithmetic on float16 arrays (5.x does; 4.x refuses them)."""
    probe = np.array([[-0.0, 1.5, 6e-8, np.inf]], np.float16)
    try:
        return bool(np.array_equal(cv2.multiply(probe, 1.0, dtype=cv2.CV_32F), probe.astype(np.float32)))
    except cv2.error:
        return False


_OPENCV_FLOAT16 = _opencv_widens_float16()


def widened(x: np.ndarray) -> np.ndarray:
    """A 2-D float16 array as float32, exactly (NaN, infinities, subnormals and -0 kept).

    Why: numpy converts half floats one at a time, 0.15 ms for a frame's 1 024 matched bank rows (152 channels)
    against 0.01 ms for OpenCV's vectorised conversion, which ``x * 1`` into float32 is.  Other dtypes, and an
    OpenCV without float16 arithmetic, go through numpy."""
    if x.dtype == np.float16 and x.ndim == 2 and x.size and _OPENCV_FLOAT16:
        return cv2.multiply(x, 1.0, dtype=cv2.CV_32F)
    return x.astype(np.float32, copy=False)


def rows_per_image(image_index: np.ndarray) -> int | None:
    """Rows per image when the bank is sorted by image with the same number of rows for every image (the
    per-image coreset's layout, which lets ``matcher.onnx`` find an image's rows by arithmetic); else None."""
    image_index = np.asarray(image_index)
    if len(image_index) == 0 or not np.all(image_index[1:] >= image_index[:-1]):
        return None
    counts = np.bincount(image_index)
    return int(counts[0]) if counts[0] > 0 and np.all(counts == counts[0]) else None


def matcher_graph_rows(image_index: np.ndarray, k: int) -> int | None:
    """Rows per image when ``matcher.onnx`` can serve this bank with K references (the per-image layout and at
    least K images, or its TopK could not run); None when it cannot."""
    rows = rows_per_image(image_index)
    return rows if rows is not None and len(image_index) // rows >= k else None


def augmented_projection(projected: np.ndarray) -> np.ndarray:
    """(n, d_l) PCA projections -> (n, d_l + 1) rows [c, -|c|^2 / 2].

    With the query written as [q, 1], one matrix product gives q.c - |c|^2 / 2 = (|q|^2 - |q - c|^2) / 2 for
    every pair, so the nearest candidate is the argmax of that product: no (M, R) temporary for the squared
    distances, and the same formula on every array module (numpy here, CuPy in ``device_matching``)."""
    projected = np.asarray(projected, dtype=np.float32)
    out = np.empty((projected.shape[0], projected.shape[1] + 1), np.float32)
    out[:, :-1] = projected
    out[:, -1] = -0.5 * np.einsum("nd,nd->n", projected, projected)
    return out


def augmented_query(xp, query):
    """(M, d_l) query projections -> (M, d_l + 1) rows [q, 1] (see :func:`augmented_projection`)."""
    out = xp.empty((query.shape[0], query.shape[1] + 1), dtype=xp.float32)
    out[:, :-1] = query
    out[:, -1] = 1.0
    return out


class SearchThreads:
    """This thread and ``n - 1`` workers, which share a search's blocks of queries (block i on thread i mod n).

    Why: asked for 2 threads, numpy's BLAS splits each block's small product between them and pays a wake-up per
    block (its workers sleep between calls, ``OPENBLAS_THREAD_TIMEOUT``): the fast profile's nearest-candidate
    search took 0.90 ms a frame on 2 cores so, and no less on one.  Whole blocks on separate threads, each product
    on one BLAS thread (numpy releases the GIL in the product and the reduction): 0.51 ms; a 1 067-block defect
    bank's search 1.37 -> 1.08 ms.  The workers wait on a queue, so they take no core between frames.  The caller
    keeps numpy's BLAS at one thread (``engines.limit_blas_threads``), or the threads' products would fight its
    pool for the cores."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a search needs at least one thread, got {n}")
        self.n = n
        self._workers = ThreadPoolExecutor(n - 1, thread_name_prefix="search") if n > 1 else None

    def run(self, work: Callable[[int, int], None], m: int, chunk: int) -> None:
        """``work(lo, hi)`` for each block ``[lo, hi)`` of ``chunk`` of the ``m`` queries; returns when all are done
        (a worker's exception is raised here)."""
        spans = [(lo, min(lo + chunk, m)) for lo in range(0, m, chunk)]
        shares = min(self.n, len(spans)) if self._workers is not None else 1

        def share(k: int) -> None:
            for lo, hi in spans[k::shares]:
                work(lo, hi)

        futures = [self._workers.submit(share, k) for k in range(1, shares)] if shares > 1 else []
        try:
            share(0)
        finally:
            wait(futures)
        for future in futures:
            future.result()


#: one thread, blocks in order: the searches' default
SERIAL = SearchThreads(1)


def nearest_candidates(xp, query_aug, candidates_aug, chunk: int | None = QUERY_CHUNK,
                       threads: SearchThreads = SERIAL):
    """Index (into the candidates) of each query's nearest candidate, by the augmented product's argmax, in
    blocks of ``chunk`` queries shared by ``threads`` (None: all at once, as on a GPU)."""
    cand_t = xp.ascontiguousarray(candidates_aug.T)
    m = query_aug.shape[0]
    if chunk is None or chunk >= m:
        return xp.argmax(query_aug @ cand_t, axis=1)
    best = xp.empty(m, dtype=xp.int64)

    def block(lo: int, hi: int) -> None:
        best[lo:hi] = xp.argmax(query_aug[lo:hi] @ cand_t, axis=1)

    threads.run(block, m, chunk)
    return best


#: (M, d_f) test PCFs and (R, d_l + 1) augmented candidate projections -> (M,) index of each PCF's nearest
#: candidate.  :class:`NumpySearch` is the reference; an engine may bring its own (``engines.OpenVinoSearch``
#: runs it in OpenVINO's thread pool beside the graphs, so numpy's BLAS pool does not fight that pool for cores)
NearestSearch = Callable[[np.ndarray, np.ndarray], np.ndarray]


class NumpySearch:
    """The nearest-candidate search on the host: PCA projection, augmented product, argmax (numpy BLAS), its
    blocks of queries shared by ``threads``."""

    def __init__(self, pca: PCA, threads: SearchThreads = SERIAL) -> None:
        self.pca = pca
        self.threads = threads

    def __call__(self, pcf: np.ndarray, candidates_aug: np.ndarray) -> np.ndarray:
        return nearest_candidates(np, augmented_query(np, self.pca.transform(pcf)), candidates_aug,
                                  threads=self.threads)


def max_candidates(image_index: np.ndarray, k: int) -> int:
    """The most bank rows K reference images can hold (the K largest per-image counts): the candidate count a
    search compiled for a static shape must hold."""
    counts = np.bincount(np.asarray(image_index, dtype=np.int64))
    return int(np.sort(counts)[::-1][:k].sum())


@dataclass(frozen=True)
class Match:
    """For each of the M test patches: bank row of its nearest normal patch and the full-space distance."""

    bank_rows: np.ndarray  # (M,) int64
    matched: np.ndarray  # (M, d_f) float32, the bank entries at bank_rows (the residual's other operand)
    distance: np.ndarray  # (M,) float32, ||p_i - p_t*||


class MemoryBank:
    """Coreset bank with per-image slices and its PCA projection, ready for restricted search."""

    def __init__(self, features: np.ndarray, image_index: np.ndarray, pca: PCA,
                 search: NearestSearch | None = None) -> None:
        image_index = np.asarray(image_index, dtype=np.int64)
        if features.ndim != 2 or features.shape[0] != image_index.shape[0]:
            raise ValueError(
                f"bank features {features.shape} and image index {image_index.shape} do not line up"
            )
        if features.shape[1] != pca.mean.shape[0]:
            raise ValueError(f"bank dim {features.shape[1]} differs from PCA input dim {pca.mean.shape[0]}")
        # The bank stays in its stored dtype (a bundle's fp16, memory-mapped: stations serving one bundle share
        # one copy of it in the page cache); only the rows a frame matches are widened to float32.  Bundles
        # store the bank sorted by image already, so sorting costs a copy only for an unsorted bank.
        if not np.all(image_index[1:] >= image_index[:-1]):
            order = np.argsort(image_index, kind="stable")
            features, image_index = features[order], image_index[order]
        self.features = features
        self.image_index = image_index
        self.pca = pca
        self.search: NearestSearch = search or NumpySearch(pca)
        projected = np.concatenate([pca.transform(features[i:i + _CHUNK])
                                    for i in range(0, len(features), _CHUNK)]) if len(features) else \
            np.zeros((0, pca.components.shape[0]), np.float32)
        self.projected_aug = augmented_projection(projected)  # (N, d_l + 1): [c, -|c|^2 / 2]
        n_images = int(self.image_index.max()) + 1 if len(self.image_index) else 0
        self.starts = np.searchsorted(self.image_index, np.arange(n_images), side="left")
        self.ends = np.searchsorted(self.image_index, np.arange(n_images), side="right")

    @property
    def n_images(self) -> int:
        return int(len(self.starts))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The bank entries at ``rows`` as float32 (M, d_f)."""
        return widened(self.features[rows])

    def rows_of(self, images: np.ndarray) -> np.ndarray:
        """Bank rows belonging to the given training images."""
        return np.concatenate([np.arange(self.starts[j], self.ends[j]) for j in np.asarray(images)])

    def match(self, pcf: np.ndarray, references: np.ndarray | None = None) -> Match:
        """Nearest bank entry for each (M, d_f) test PCF among the references' patches (all if None)."""
        pcf = np.asarray(pcf, dtype=np.float32)
        rows = np.arange(len(self.features)) if references is None else self.rows_of(references)
        # argmin_t |q - c_t|^2 = argmax_t (q.c_t - |c_t|^2 / 2): one GEMM per block of queries, no (M, n, d) tensor
        best = rows[self.search(pcf, self.projected_aug[rows])]
        matched = self.rows(best)
        diff = pcf - matched
        distance = np.sqrt(np.einsum("md,md->m", diff, diff))
        return Match(bank_rows=best, matched=matched, distance=distance)


def posfar_residual(pcf: np.ndarray, matched: np.ndarray, thetas: tuple[float, ...] = (1.0, 2.0)) -> np.ndarray:
    """PosFAR residual r_i = |p_i - p_t*|^theta for each theta, averaged channel-wise back to d_f.

    Concatenating the theta powers and pooling the 2*d_f channels back to d_f in pairs is the same as
    averaging the powers per channel, which is what this computes, as float32 (M, d_f).
    """
    diff = np.subtract(pcf, matched, dtype=np.float32)
    np.abs(diff, out=diff)
    # in place, powers 1 and 2 without pow(): a quarter of a frame's numpy time otherwise.  Two terms add the same
    # either way round, so |d| itself goes last and is summed into without a copy of it
    ordered = sorted(thetas, key=lambda t: t == 1.0) if len(thetas) == 2 else list(thetas)
    out: np.ndarray | None = None
    for i, theta in enumerate(ordered):
        term = diff if theta == 1.0 else diff * diff if theta == 2.0 else diff ** np.float32(theta)
        if out is None:
            out = term.copy() if term is diff and i < len(ordered) - 1 else term
        else:
            out += term
    out /= np.float32(len(thetas))
    return out
