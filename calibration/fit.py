"""``fit``: a new bundle version from a base bundle and a few dozen good frames, on the edge box.

What carries over and what is refitted: the backbone and the residual Swin graphs are copied unchanged
(the Swin classifies PosFAR residuals, not appearance, so it transfers between similar products); the
coreset bank, the PCA, the reference descriptors, the foreground maps (when the base has them) and the
image threshold are refitted from the frames.  The threshold is chosen on held-out frames that are not in
the bank (plus, when the base bundle's threshold was estimated so, the bank frames each left out of its own
retrieval), scored by exactly the code and the fp16 arrays the edge will use.

The new bundle records its parent in the manifest and the calibration data in a hash-checked sidecar
``calibration.json`` (listed in the manifest's files); the manifest's free-form ``producer`` map carries
the digest of the frames too, so ``check-bundle`` shows it without opening the sidecar.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_runtime import __version__
from edge_runtime.core import bundle as B
from edge_runtime.core.components import Components, LogicalScoring, Standardisation, fit_logical
from edge_runtime.core.fitting import BankBuilder, split_holdout
from edge_runtime.core.foreground import ForegroundBuilder
from edge_runtime.core.matching import matcher_graph_rows, rows_per_image
from edge_runtime.core.pipeline import (
    STANDARDISED,
    Inspector,
    MapFusion,
    PosFARScorer,
    open_inspector,
    shift_averaged,
)
from edge_runtime.core.scoring import DistanceStandardiser
from edge_runtime.core.signing import sign_bundle
from edge_runtime.core.thresholds import ThresholdEstimate, estimate_threshold
from edge_runtime.store import BundleStore, StoreError, check_version_name

from .errors import CalibrationError
from .frames import FrameSet, LoadedFrame, load_frames

MIN_FRAMES = 10
SIDECAR = "calibration.json"
SIDECAR_SCHEMA = "weakrest.calibration/1"


@dataclass
class FitReport:
    bundle: str
    version: str
    product: str
    parent: str
    n_frames: int
    n_bank_frames: int
    threshold: ThresholdEstimate
    data_digest: str
    duplicates: list[str] = field(default_factory=list)
    store_version: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["threshold"] = self.threshold.to_json()
        return out


def _features(inspector: Inspector, frames: list[LoadedFrame], desc: str, quiet: bool
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for frame in tqdm(frames, desc=desc, unit="frame", disable=quiet):
        yield inspector.features(frame.image)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an out folder that is live in a store, or that exists (unless ``overwrite``); create its parent."""
    resolved = out.resolve()
    for link in ("current", "previous"):
        sibling = out.parent / link
        if sibling.is_symlink() and sibling.resolve() == resolved:
            raise CalibrationError(f"{out}: is the store's {link!r} version; write the new bundle elsewhere "
                                   "(or use --store/--product)")
    if out.exists() and not overwrite:
        raise CalibrationError(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"{out.parent}: cannot create the output folder ({exc.strerror or exc})") from None


def _capture_log(images: Path) -> dict | None:
    """The camera section of ``capture.json`` when the frames came from ``weakrest-calibrate capture``."""
    path = images / "capture.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("camera")
    except (OSError, ValueError, AttributeError):
        return None


def calibrate(base: Path, images: Path, out: Path | None, *, holdout: float = 0.2,
              target_false_reject: float | None = None, seed: int = 0, quiet: bool = False,
              mixed_sizes: bool = False, version: str | None = None, product: str | None = None,
              store: Path | None = None, overwrite: bool = False, min_frames: int = MIN_FRAMES,
              sign_key: Path | None = None) -> FitReport:
    """Refit ``base`` on the good frames in ``images``; write the bundle to ``out`` and/or add it to ``store``.

    Raises :class:`CalibrationError` (base bundle refused, bad frames, unwritable output, store refusal);
    the store's active bundle is never touched (a new version is only added, not activated).  ``sign_key``
    signs the new bundle (a store whose service requires signatures refuses it otherwise).
    """
    t0 = time.perf_counter()
    if not 0.0 < holdout < 1.0:
        raise CalibrationError(f"--holdout must be between 0 and 1 (exclusive), got {holdout}")
    if out is None and store is None:
        raise CalibrationError("give --out or --store/--product (or both)")
    if out is not None:
        _check_out(out, overwrite)
    try:
        inspector = open_inspector(base)  # hashes, arrays and a smoke run of both graphs
    except B.BundleError as exc:
        raise CalibrationError(f"base bundle {base} refused: {exc}") from None
    bundle = inspector.bundle
    m = bundle.manifest
    target = m.thresholds.target_false_reject if target_false_reject is None else target_false_reject
    if not 0.0 < target < 1.0:
        raise CalibrationError(f"--target-false-reject must be between 0 and 1 (exclusive), got {target}")
    product = product or m.product
    version = version or time.strftime("%Y%m%d-%H%M%S") + "-cal"
    target_store = BundleStore(store) if store is not None else None
    if target_store is not None:
        try:
            check_version_name(version)
            if version in target_store.versions(product):
                raise CalibrationError(f"{target_store.product_dir(product) / version}: version already in the store "
                                       "(pass --version)")
        except StoreError as exc:
            raise CalibrationError(str(exc)) from None
    frameset: FrameSet = load_frames(images, tuple(m.preprocessing.input_size), min_frames, mixed_sizes)
    t_read = time.perf_counter()
    try:
        bank_idx, holdout_idx = split_holdout(list(range(len(frameset.frames))), holdout, seed)
    except ValueError as exc:
        raise CalibrationError(f"{images}: {exc}") from None
    bank_frames = [frameset.frames[i] for i in bank_idx]
    holdout_frames = [frameset.frames[i] for i in holdout_idx]

    foreground = ForegroundBuilder(tuple(m.backbone.grid), seed=seed) if m.foreground is not None else None
    builder = BankBuilder(m.posfar.coreset_ratio, seed=seed, foreground=foreground)
    bank_features = list(_features(inspector, bank_frames, "bank frames", quiet))
    for pcf, desc in bank_features:
        builder.add(pcf[None], desc[None])
    fitted = builder.build(m.posfar.d_l)
    t_bank = time.perf_counter()

    fg = m.foreground
    manifest = m.model_copy(update={
        "product": product,
        "bundle_version": version,
        "created_at": B.now_iso(),
        "parent": f"{m.product}@{m.bundle_version}",
        "producer": {**m.producer, "weakrest-calibrate": __version__,
                     "calibration_data": f"sha256:{frameset.digest} ({len(frameset.frames)} frames)"},
        "posfar": m.posfar.model_copy(update={"n_reference_images": builder.n_images,
                                              "n_bank": int(fitted.bank.shape[0])}),
        "foreground": (fg.model_copy(update={"n_fit_images": min(foreground.fit_images, builder.n_images)})
                       if fg is not None and foreground is not None else None),
        "files": {},
        # int8 graphs and their accuracy gates were measured against the old bank on labelled defects, which a
        # field calibration has not got: the new bundle runs the exact engines (fp32 ONNX Runtime / OpenVINO) and
        # gets int8 back only through ``weakrest-train quantize`` on data with defects
        "precision": None,
    })
    arrays = fitted.arrays()
    if "defect_bank" in bundle.arrays:  # the labelled defects' features: the same backbone's, kept as they are
        arrays["defect_bank"] = np.asarray(bundle.arrays["defect_bank"])
    # score the hold-outs as the edge will: the bundle's own scorer over the fp16 arrays it will read
    holdout_features = list(_features(inspector, holdout_frames, "hold-out frames", quiet))
    classifier = inspector.scorer.classifier
    scorer = PosFARScorer.from_bundle(B.Bundle(root=bundle.root, manifest=manifest, arrays=arrays),
                                      classifier=classifier, image_score="map",
                                      logical_verdict="structural")
    holdout_evidence = [scorer.evidence(p, d) for p, d in holdout_features]
    bank_evidence = [scorer.evidence(p, d, exclude=j) for j, (p, d) in enumerate(bank_features)]
    if "reference_distances" in bundle.arrays:  # new references, new bank: their leave-one-out distances
        standardiser = DistanceStandardiser(np.stack([e.distance.reshape(tuple(m.backbone.grid))
                                                      for e in bank_evidence]).astype(np.float16))
        arrays = {**arrays, **standardiser.arrays()}
        scorer = scorer.with_standardiser(standardiser)
    scorer = scorer.with_standardiser(scorer.standardiser, m.scoring.image_score)
    if classifier is not None and m.scoring.fusion is not None:  # the new bank moves the distances: rescale
        f = m.scoring.fusion
        rescaled = MapFusion.calibrate(f.rule, np.stack([e.map_distance for e in holdout_evidence]),
                                       np.stack([e.probability for e in holdout_evidence]),
                                       f.weight, f.swin_excess_weight, f.distance_excess_weight)
        manifest = manifest.model_copy(update={"scoring": m.scoring.model_copy(update={
            "fusion": m.scoring.fusion.model_copy(update={"distance_scale": rescaled.distance_scale,
                                                          "swin_scale": rescaled.swin_scale})})})
        if m.scoring.anomaly_map == "fused":
            scorer = scorer.with_fusion(rescaled)
    holdout_scored = [scorer.finish(e) for e in holdout_evidence]
    # as the base bundle's threshold was estimated: with leave-one-out scores of the bank frames when it was
    loo = [scorer.finish(e) for e in bank_evidence] if m.thresholds.n_leave_one_out else []
    if m.logical is not None:  # the same component classes; the good composition and both scales from the frames
        lg = m.logical
        components = Components(bundle.arrays["component_centres"], tuple(m.backbone.grid), lg.regions)
        try:
            model, bank_logical, holdout_logical = fit_logical(
                components, np.stack([components(p).summary for p, _ in bank_features]),
                np.stack([components(p).summary for p, _ in holdout_features]), seed=seed)
            structural = Standardisation.fit([s.score for s in holdout_scored + loo])
            logical_std = Standardisation.fit(np.concatenate([holdout_logical, bank_logical]))
        except ValueError as exc:
            raise CalibrationError(f"{images}: cannot refit the logical score ({exc})") from None
        scorer = scorer.with_logical(LogicalScoring(components, model, structural, logical_std, lg.rule, lg.weight))
        holdout_scored = [scorer.finish(replace(e, logical_score=float(v)))
                          for e, v in zip(holdout_evidence, holdout_logical, strict=True)]
        if loo:
            loo = [scorer.finish(replace(e, logical_score=float(v)))
                   for e, v in zip(bank_evidence, bank_logical, strict=True)]
        arrays = {**arrays, "component_centres": components.centres, "logical_mean": model.mean,
                  "logical_precision": model.precision, "logical_group_stats": model.group_stats}
        manifest = manifest.model_copy(update={"logical": lg.model_copy(update={
            "structural_mean": structural.mean, "structural_std": structural.std,
            "logical_mean": logical_std.mean, "logical_std": logical_std.std})})
    if m.scoring.frame_shift:  # each frame's scores the mean of four, as the edge computes them
        holdout_scored = shift_averaged(
            holdout_scored, lambda dy, dx: (scorer.score(*inspector.features(f.image, (dy, dx)))
                                            for f in holdout_frames), m.scoring.frame_shift, m.scoring.score_pool)
        if loo:
            loo = shift_averaged(
                loo, lambda dy, dx: (scorer.score(*inspector.features(f.image, (dy, dx)), exclude=j)
                                     for j, f in enumerate(bank_frames)), m.scoring.frame_shift, m.scoring.score_pool)
    scores = np.array([s.score for s in holdout_scored])
    thr = estimate_threshold(np.concatenate([scores, [s.score for s in loo]]), target, m.thresholds.margin,
                             n_leave_one_out=len(loo))
    pixel = None  # a verdict not on the heatmap: the heatmap's regions keep a threshold of their own
    if scorer.image_score in STANDARDISED or (scorer.image_score == "distance" and classifier is not None):
        pixel = estimate_threshold([s.map_score for s in holdout_scored + loo], target, m.thresholds.margin,
                                   n_leave_one_out=len(loo))
    manifest = manifest.model_copy(update={"thresholds": B.Thresholds.from_estimate(thr, pixel)})
    t_score = time.perf_counter()

    sidecar = {
        "schema": SIDECAR_SCHEMA,
        "parent": manifest.parent,
        "base_manifest_sha256": B.sha256_of(bundle.root / B.MANIFEST),
        "tool": f"weakrest-calibrate {__version__}",
        "frames": {"count": len(frameset.frames), "digest": frameset.digest,
                   "digest_of": "sha256 of the sorted per-file sha256s, one per line",
                   "folder": str(images.resolve()), "duplicates_dropped": frameset.duplicates,
                   "bank": [{"file": f.path.name, "sha256": f.sha256} for f in bank_frames],
                   "holdout": [{"file": f.path.name, "sha256": f.sha256, "score": round(float(s), 6)}
                               for f, s in zip(holdout_frames, scores, strict=True)]},
        "threshold": {**thr.to_json(), "seed": seed, "holdout_fraction": holdout},
        "camera": _capture_log(images),
    }
    files = {B.BACKBONE: bundle.backbone_path}
    if bundle.swin_path is not None:
        files[B.SWIN] = bundle.swin_path
    # matcher.onnx holds no bank (its arrays are inputs) and depends on the bank only through its layout and K
    rows = matcher_graph_rows(arrays["bank_image"], manifest.posfar.k_references)
    if bundle.matcher_path is not None and rows is not None and rows == rows_per_image(bundle.arrays["bank_image"]):
        files[B.MATCHER] = bundle.matcher_path
    with tempfile.TemporaryDirectory(prefix="weakrest-cal-") as tmp:
        (Path(tmp) / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        files[SIDECAR] = Path(tmp) / SIDECAR
        dest = out if out is not None else Path(tmp) / "bundle"
        try:
            B.write_bundle(dest, manifest, files, arrays)
        except OSError as exc:
            raise CalibrationError(f"{dest}: cannot write the new bundle ({exc.strerror or exc}); nothing was "
                                   "written there") from None
        try:
            open_inspector(dest)  # never hand out a bundle that does not verify and run
        except B.BundleError as exc:
            raise CalibrationError(f"{dest}: the new bundle failed validation ({exc})") from None
        if sign_key is not None:
            try:
                sign_bundle(dest, sign_key)
            except B.BundleError as exc:
                raise CalibrationError(f"cannot sign the new bundle: {exc}") from None
        store_version = None
        if target_store is not None:
            try:
                store_version = target_store.add(product, dest, version=version, validate=open_inspector)
            except StoreError as exc:
                raise CalibrationError(str(exc)) from None
    t_end = time.perf_counter()
    if out is not None:
        where = str(out)
    else:
        assert target_store is not None
        where = str(target_store.product_dir(product) / version)
    return FitReport(
        bundle=where, version=version, product=product, parent=manifest.parent or "", n_frames=len(frameset.frames),
        n_bank_frames=builder.n_images, threshold=thr, data_digest=frameset.digest, duplicates=frameset.duplicates,
        store_version=store_version,
        seconds={"read": round(t_read - t0, 2), "bank": round(t_bank - t_read, 2),
                 "threshold": round(t_score - t_bank, 2), "write": round(t_end - t_score, 2),
                 "total": round(t_end - t0, 2)},
    )


def describe(report: FitReport) -> list[str]:
    """Human-readable lines for the terminal (what the threshold rests on, and when that is too little)."""
    t = report.threshold
    lines = [
        f"bundle {report.bundle}: {report.product}@{report.version} (parent {report.parent}), "
        f"{report.n_bank_frames} bank frames, {report.n_frames} frames in all, {report.seconds['total']:.1f} s",
        f"threshold {t.threshold:.4g} = {t.quantile_score:.4g} ((1 - {t.target_false_reject:g}) quantile of "
        f"{_scores_of(t)}, highest {t.max_score:.4g}) + margin {t.margin:.4g} "
        f"({t.margin_factor:g} x spread)",
        f"calibration data: sha256:{report.data_digest} ({report.n_frames} frames)",
    ]
    if report.store_version:
        lines.append(f"added to the store as {report.product}/{report.store_version} (not active: run "
                     f"'weakrest-calibrate activate')")
    for dup in report.duplicates:
        lines.append(f"skipped duplicate: {dup}")
    if not t.enough_frames:
        lines.append(f"warning: the threshold rests on {_scores_of(t)}; a false-reject target of "
                     f"{t.target_false_reject:.2%} needs at least {t.min_frames_for_target} to be measured, so it is "
                     "the highest of these scores plus the margin: check it with 'weakrest-calibrate verify' on more "
                     "good frames")
    return lines


def _scores_of(t: ThresholdEstimate) -> str:
    if not t.n_leave_one_out:
        return f"{t.n_scores} held-out good frames"
    return (f"{t.n_scores} good scores: {t.n_scores - t.n_leave_one_out} held-out frames + {t.n_leave_one_out} "
            "bank frames each left out of its own retrieval")
