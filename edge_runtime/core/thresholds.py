"""The image threshold, and what a rate measured on a few images can show.

One home for both, used by the training host's fit and evaluation and by field calibration (fit and
verify): a threshold is a quantile of good images' scores that the bank never saw, and every rate that
comes from counting images ("0 of 40 good frames rejected") is reported with its Clopper-Pearson bound,
because a small count cannot show a 0.5 % target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LINE_FALSE_REJECT_RATES = (0.005, 0.01, 0.02)  # the operating points a line is run at


def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp
                                 + (n - i) * lq) for i in range(k + 1)))


def rate_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen as ``k`` of ``n``."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > 1.0 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def rate_lower_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a rate seen as ``k`` of ``n``."""
    return 1.0 - rate_upper_bound(n - k, n, confidence)


@dataclass(frozen=True)
class ThresholdEstimate:
    """The chosen image threshold and what it rests on, in numbers a field engineer can judge."""

    threshold: float
    n_scores: int  # good images scored by a bank that did not contain them (held out, or left out of retrieval)
    target_false_reject: float
    quantile_score: float  # the (1 - target) quantile of their scores
    max_score: float
    margin: float  # threshold - quantile_score (margin factor x spread)
    margin_factor: float
    n_above: int  # held-out good scores at or above the threshold (the false rejects it would have made)
    frr_upper95: float  # 95 % upper bound of the false-reject rate that these scores can show
    min_frames_for_target: int  # 1 / target: below it the target rate cannot be resolved
    source: str = "holdout"  # "holdout", or "holdout+loo": also the bank images, each left out of its retrieval
    n_leave_one_out: int = 0  # of the n_scores scores, how many are leave-one-out scores of bank images

    @property
    def enough_frames(self) -> bool:
        return self.n_scores >= self.min_frames_for_target

    def to_json(self) -> dict:
        return {**asdict(self), "enough_frames": self.enough_frames}


def estimate_threshold(good_scores: Sequence[float] | np.ndarray, target_false_reject: float = 0.005,
                       margin_factor: float = 0.05, n_leave_one_out: int = 0) -> ThresholdEstimate:
    """Threshold from scores of good images that were *not* in the bank.

    Takes the (1 - target) quantile of the held-out good scores (the highest score when there are too few
    images to resolve the target rate) and adds ``margin_factor`` times the spread (q99 - median) so that
    the threshold is not pinned to a single frame.  ``frr_upper95`` says how far the false-reject rate at
    that threshold can be from what the held-out images show: with n images and none above it, the true
    rate is below 1 - 0.05^(1/n) with 95 % confidence (3.9 % for 76 images, 0.5 % needs 600).
    ``n_leave_one_out`` says how many of the scores are leave-one-out scores of bank images (the rest are
    held-out images), which is recorded with the estimate.
    """
    if not 0.0 < target_false_reject < 1.0:
        raise ValueError(f"target_false_reject must be between 0 and 1, got {target_false_reject}")
    scores = np.asarray(good_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("cannot choose a threshold without held-out good scores")
    quantile = float(np.quantile(scores, 1.0 - target_false_reject, method="higher"))
    spread = float(np.quantile(scores, 0.99) - np.median(scores))
    threshold = quantile + margin_factor * spread
    n_above = int((scores >= threshold).sum())
    return ThresholdEstimate(threshold=threshold, n_scores=int(scores.size), target_false_reject=target_false_reject,
                             quantile_score=quantile, max_score=float(scores.max()),
                             margin=threshold - quantile, margin_factor=margin_factor, n_above=n_above,
                             frr_upper95=rate_upper_bound(n_above, int(scores.size)),
                             min_frames_for_target=math.ceil(1.0 / target_false_reject),
                             source="holdout+loo" if n_leave_one_out else "holdout",
                             n_leave_one_out=int(n_leave_one_out))


def detection_at_false_reject(good_scores: Sequence[float] | np.ndarray, bad_scores: Sequence[float] | np.ndarray,
                              rates: Sequence[float] = LINE_FALSE_REJECT_RATES) -> list[dict]:
    """Detection rate of defective images at the strictest threshold that rejects at most ``rate`` of the
    good images, for each rate: how the model would do on a line run at that false-reject rate.

    With n good images, at most floor(rate * n) of them may score at or above the threshold; below 1 / rate
    good images that is none, which is reported (``resolved: false``) since the rate is then not shown."""
    good = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    bad = np.asarray(bad_scores, dtype=np.float64)
    if good.size == 0:
        raise ValueError("detection at a false-reject rate needs good images")
    out = []
    for rate in rates:
        allowed = math.floor(rate * good.size + 1e-9)
        # strictly above the (allowed + 1)-th highest good score: exactly `allowed` good images reach it
        threshold = float(np.nextafter(good[allowed], np.inf))
        detected = int((bad >= threshold).sum())
        out.append({"false_reject_rate": rate, "threshold": threshold,
                    "false_rejects": int((good >= threshold).sum()), "n_good": int(good.size),
                    "detected": detected, "n_defective": int(bad.size),
                    "detection_rate": detected / bad.size if bad.size else None,
                    "resolved": good.size >= math.ceil(1.0 / rate)})
    return out
