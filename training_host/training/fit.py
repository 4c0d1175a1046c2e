"""Fit a product: good images -> features -> coreset bank, PCA, references (+ foreground maps) -> residual
Swin trained on good and synthetic (and, supervised, real defective) residual fields -> threshold -> bundle."""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

import edge_runtime
from edge_runtime.core import bundle as B
from edge_runtime.core.components import (
    LogicalScoring,
    PatchSampler,
    Standardisation,
    fit_components,
    fit_logical,
)
from edge_runtime.core.defect_bank import DefectBank
from edge_runtime.core.engines import OnnxRuntimeEngine
from edge_runtime.core.fitting import BankBuilder, FittedPosFAR, split_holdout
from edge_runtime.core.foreground import ForegroundBuilder
from edge_runtime.core.pipeline import (
    FUSION_QUANTILE,
    MapFusion,
    PosFARScorer,
    Scored,
    SwinClassifier,
    fusion_scale,
    shift_averaged,
)
from edge_runtime.core.scoring import DistanceStandardiser, check_frame_shift, shifted_frame
from edge_runtime.core.thresholds import estimate_threshold
from training_host.config import ProductConfig
from training_host.data.dataset import load_batch, scan_dataset
from training_host.data.synthetic import AnomalySynthesizer, SyntheticConfig, save_sample_grid
from training_host.labels.weak_labels import LabelSet, load_labels
from training_host.models.export import export_backbone, export_swin
from training_host.models.features import PatchFeatureExtractor, build_extractor, extract
from training_host.models.matcher_graph import write_matcher_graph
from training_host.models.swin import ResidualSwin, SwinEnsemble, SwinShape
from training_host.training.cache import FitCache, features_key, residuals_key
from training_host.training.distributed import SINGLE, Distributed
from training_host.training.residual_data import (
    BOX_BANK_LEVEL,
    LabelledDefect,
    ResidualFieldMaker,
    ResidualSet,
    box_block_features,
    defect_block_features,
    defect_fields,
    pick_defects,
    read_resized,
    synthetic_fields,
    weak_fields,
)
from training_host.training.resmixmatch import ResMixMatch, ResMixMatchConfig
from training_host.training.train_swin import SwinTrainer

log = logging.getLogger(__name__)


@dataclass
class TrainingOptions:
    """How the anomaly map is learned (``weakrest-train fit --mode ...``)."""

    mode: Literal["unsupervised", "supervised", "weak"] = "unsupervised"
    supervised_from: Path | None = None  # dataset whose test split gives the real defects
    labels: Path | None = None  # weak mode: label file (boxes, rotated boxes, tags, blocks)
    labels_root: Path | None = None  # the label file's image keys are relative to this (default: the data)
    n_defects: int = 10
    defect_seed: int = 0
    checkpoint_dir: Path | None = None  # default: <out>.ckpt beside the bundle
    resume: bool = False
    init: Path | None = None  # start from this checkpoint's EMA weights instead of training the first phase
    synthetic_preview: Path | None = None  # write a picture grid of synthetic anomalies here
    cache_dir: Path | None = None  # reuse features and residual fields of earlier fits (experiments only)
    dist: Distributed = SINGLE  # this process's rank under torchrun (training_host/training/distributed.py)


@dataclass
class FitSummary:
    bundle: Path
    n_train: int
    n_holdout: int
    n_bank: int
    d_f: int
    d_l: int
    threshold: float
    onnx_max_abs_diff: float
    bundle_bytes: int
    anomaly_map: str = "nn_distance"
    swin: dict | None = None
    foreground: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    threshold_estimate: dict = field(default_factory=dict)  # ThresholdEstimate.to_json(): what it rests on
    precision: list[str] = field(default_factory=list)  # export.int8: the int8 graphs kept and each gate's verdict

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "bundle"}
        out["bundle"] = str(self.bundle)
        return out


def _batches(paths: list[Path], size: int):
    for lo in range(0, len(paths), size):
        yield paths[lo : lo + size]


def _features(extractor: PatchFeatureExtractor, paths: list[Path], cfg: ProductConfig, desc: str,
              skipped: list[str], progress: bool, loaded: list[Path] | None = None, dist: Distributed = SINGLE,
              shift: tuple[int, int] = (0, 0)):
    """Patch features of ``paths`` in batches; unreadable images are reported in ``skipped`` and the ones
    that loaded are appended to ``loaded`` (their order is the bank's image index).  Under torchrun each
    rank extracts its share of the batches and every rank gets all of them, in order.  ``shift``: of the images
    moved that many pixels down and right (``scoring.frame_shift``)."""
    chunks = list(_batches(paths, cfg.batch_size))

    def compute(b: int):
        batch, ok, errors = load_batch(chunks[b], cfg.input_size)
        if shift != (0, 0):
            batch = shifted_frame(batch, *shift)
        arrays = {"ok": np.asarray(ok, dtype=np.int64)}
        if len(ok):
            arrays["pcf"], arrays["descriptor"] = extract(extractor, batch)
        return arrays, errors

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    for chunk, (arrays, errors) in zip(chunks, dist.map_batches(len(chunks), compute), strict=True):
        skipped.extend(errors)
        if loaded is not None:
            loaded.extend(chunk[i] for i in arrays["ok"])
        if len(arrays["ok"]):
            yield arrays["pcf"], arrays["descriptor"]
        bar.update(len(chunk))
    bar.close()


def _cached_features(cache: FitCache | None, extractor: PatchFeatureExtractor, paths: list[Path],
                     cfg: ProductConfig, desc: str, skipped: list[str], progress: bool,
                     loaded: list[Path] | None = None, dist: Distributed = SINGLE, shift: tuple[int, int] = (0, 0)):
    """:func:`_features` through the fit cache: the same batches, from disk when these images' features at
    these settings were computed before."""
    if cache is None:
        yield from _features(extractor, paths, cfg, desc, skipped, progress, loaded, dist, shift)
        return
    key = features_key(cfg, paths, shift)
    hit = cache.load("features", key)
    if hit is not None:
        arrays, meta = hit
        skipped.extend(meta["skipped"])
        if loaded is not None:
            loaded.extend(paths[i] for i in meta["ok"])
        pcf, descriptor = arrays["pcf"], arrays["descriptor"]
        for lo in range(0, len(pcf), cfg.batch_size):
            yield pcf[lo : lo + cfg.batch_size], descriptor[lo : lo + cfg.batch_size]
        return
    pcfs, descs, ok_paths, errors = [], [], [], []
    for pcf, descriptor in _features(extractor, paths, cfg, desc, errors, progress, ok_paths, shift=shift):
        pcfs.append(pcf)
        descs.append(descriptor)
        yield pcf, descriptor
    skipped.extend(errors)
    if loaded is not None:
        loaded.extend(ok_paths)
    if pcfs:
        index = {p: i for i, p in enumerate(paths)}
        cache.save("features", key, {"pcf": np.concatenate(pcfs), "descriptor": np.concatenate(descs)},
                   {"ok": [index[p] for p in ok_paths], "skipped": errors})


def _shift_averaged(scored: list[Scored], scorer: PosFARScorer, extractor: PatchFeatureExtractor,
                    cache: FitCache | None, paths: list[Path], cfg: ProductConfig, progress: bool,
                    leave_one_out: bool) -> list[Scored]:
    """``scored`` (one per image of ``paths`` that loaded, in order) averaged with the same images moved by
    ``scoring.frame_shift``, as the edge does; ``leave_one_out``: image j is left out of its own retrieval, as the
    bank images' scores are."""
    def moved(dy: int, dx: int):
        j = 0
        for pcf, descriptor in _cached_features(cache, extractor, paths, cfg, f"frames moved by ({dy}, {dx})", [],
                                                progress, shift=(dy, dx)):
            for p, d in zip(pcf, descriptor, strict=True):
                yield scorer.score(p, d, exclude=j if leave_one_out else None)
                j += 1

    return shift_averaged(scored, moved, cfg.scoring.frame_shift, cfg.scoring.score_pool)


def _refine_info(refine) -> B.RefineInfo | None:
    """The manifest's refinement: ``peak_power`` only when it is on, so a bundle without it keeps its schema."""
    if refine is None:
        return None
    return B.RefineInfo(**{**refine.model_dump(), "peak_power": refine.peak_power or None})


def producer_versions() -> dict[str, str]:
    import onnx

    return {"weakrest": edge_runtime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass
class _TrainedSwin:
    model: ResidualSwin | SwinEnsemble
    onnx_path: Path
    onnx_diff: float
    info: B.TrainingInfo
    phases: list[dict]


def _training_fields(cfg: ProductConfig, maker: ResidualFieldMaker, fitted: FittedPosFAR,
                     bank_paths: list[Path], cache: FitCache | None, progress: bool, good: ResidualSet | None = None
                     ) -> tuple[ResidualSet, ResidualSet, list[tuple[np.ndarray, np.ndarray]]]:
    """Good and synthetic residual fields of the bank images (and a few synthetic samples for a preview),
    through the fit cache when one is given.  ``good``: the bank's good fields made already (they depend on the
    bank only, not on the seed), so another ensemble member makes only its synthetic ones."""
    key = residuals_key(cfg, features_key(cfg, bank_paths)) if cache is not None else None
    hit = cache.load("residuals", key) if cache is not None and key is not None else None
    if hit is not None:
        a, _ = hit
        good = ResidualSet(torch.from_numpy(a["good_fields"]), torch.from_numpy(a["good_labels"]),
                           ["good"] * len(a["good_fields"]))
        synthetic = ResidualSet(torch.from_numpy(a["synthetic_fields"]), torch.from_numpy(a["synthetic_labels"]),
                                ["synthetic"] * len(a["synthetic_fields"]))
        preview = list(zip(a["preview_images"], a["preview_masks"], strict=True)) if "preview_images" in a else []
        return good, synthetic, preview
    sc = cfg.swin
    images, ok, errors = read_resized(bank_paths, cfg.input_size)
    if len(ok) != len(bank_paths):  # these all loaded for the bank: image j must stay bank image j
        raise ValueError(f"bank images became unreadable during the fit: {'; '.join(errors)}")
    if good is None:
        good = maker.make(images, [None] * len(images), list(range(len(images))), "good", progress)
    rng = np.random.default_rng(cfg.seed)
    donors = [images[i] for i in rng.permutation(len(images))[:32]]
    synth_cfg = SyntheticConfig(**cfg.synthetic.model_dump())  # the config section holds its knobs, one to one
    synthesizer = AnomalySynthesizer(donors, synth_cfg, seed=cfg.seed)
    synthetic, preview = synthetic_fields(maker, images, sc.synthetic_per_image, synthesizer,
                                          fitted.foreground_maps, cfg.seed, progress)
    if cache is not None and key is not None:
        arrays = {"good_fields": good.fields.numpy(), "good_labels": good.labels.numpy(),
                  "synthetic_fields": synthetic.fields.numpy(), "synthetic_labels": synthetic.labels.numpy()}
        if preview:
            arrays["preview_images"] = np.stack([p[0] for p in preview])
            arrays["preview_masks"] = np.stack([p[1] for p in preview])
        cache.save("residuals", key, arrays, {"good": len(good), "synthetic": len(synthetic)})
    return good, synthetic, preview


_MEMBER_SEED_STEP = 1_000  # member m of an ensemble trains with seed + 1000 m (its anomalies, start and batches)


def _train_swin(cfg: ProductConfig, opts: TrainingOptions, extractor: PatchFeatureExtractor, fitted: FittedPosFAR,
                bank_paths: list[Path], defects: list[LabelledDefect], weak: LabelSet | None, weak_root: Path,
                out: Path, tmp: Path, skipped: list[str], progress: bool,
                cache: FitCache | None = None) -> _TrainedSwin | None:
    """Residual fields (good, synthetic, real defects) -> trained, exported, checked ``swin.onnx``.

    With ``swin.members`` > 1 that many Swins are trained, each on its own synthetic anomalies (drawn with its own
    seed, on the same bank) and from its own initialisation, and ``swin.onnx`` averages their probabilities.
    """
    t0 = time.perf_counter()
    sc = cfg.swin
    inits = [_member_init(opts.init, m, sc.members, opts.dist) for m in range(sc.members)]
    nn_scorer = fitted.scorer(cfg.posfar.k_references, extractor.grid, cfg.input_size, cfg.posfar.retrieval_trim,
                              cfg.scoring.blur_sigma, cfg.scoring.score_pool, tuple(cfg.posfar.thetas))
    maker = ResidualFieldMaker(extractor, nn_scorer, cfg.labels.eps_pos, cfg.labels.eps_neg, cfg.batch_size,
                               cfg.labels.min_positive_px, dist=opts.dist)
    good, synthetic, preview = _training_fields(cfg, maker, fitted, bank_paths, cache, progress)
    if opts.synthetic_preview is not None and preview and opts.dist.is_main:
        save_sample_grid(preview, opts.synthetic_preview)
    shape = SwinShape(in_dim=extractor.d_f, embed_dim=sc.embed_dim, depth=sc.depth, heads=sc.heads, window=sc.window,
                      mlp_ratio=sc.mlp_ratio, train_window=sc.train_window, window_stride=sc.window_stride,
                      log_input=sc.log_input, grid=extractor.grid if sc.position_embedding else None,
                      magnitude_skip=sc.magnitude_skip)
    ckpt = opts.checkpoint_dir or out.parent / f"{out.name}.ckpt"
    labelled: list[B.LabelledImage] = []
    real = weak_set = None
    if opts.mode == "supervised":
        real, errors = defect_fields(maker, defects, bank_paths, sc.defect_transplants, cfg.seed)
        skipped.extend(errors)
        if not len(real):
            raise ValueError(f"{opts.supervised_from}: none of the {len(defects)} picked defective images is readable")
        labelled = [B.LabelledImage(name=d.name, sha256=d.sha256, defect_type=d.sample.defect_type) for d in defects]
    if opts.mode == "weak" and weak is not None:
        wc = cfg.weak
        weak_set, used, errors = weak_fields(maker, weak, weak_root, wc.box_overlap, wc.box_lines, wc.tag_top_k)
        skipped.extend(errors)
        if not len(weak_set):
            raise ValueError(f"{opts.labels}: none of the {len(weak.images)} labelled images is readable")
        labelled = [B.LabelledImage(name=d.name, sha256=d.sha256, defect_type=d.sample.defect_type) for d in used]
    members, phases, n_synthetic = [], [], 0
    for m in range(sc.members):
        seed = cfg.seed + _MEMBER_SEED_STEP * m
        if m:  # another member: its own synthetic anomalies on the same bank, its own start and batches
            member_cfg = cfg.model_copy(update={"seed": seed})
            synthetic = _training_fields(member_cfg, maker, fitted, bank_paths, cache, progress, good)[1]
        n_synthetic += synthetic.count("synthetic")
        data = ResidualSet.concat([good, synthetic])
        torch.manual_seed(seed)
        model = ResidualSwin(shape)
        model.set_input_scale(good.fields.float())
        trainer = SwinTrainer(model, sc, ckpt / f"member{m}" if m else ckpt, seed=seed, resume=opts.resume,
                              dist=opts.dist)
        member_phases, steps = _train_member(cfg, inits[m], trainer, data, real, weak_set, progress)
        phases.extend({**p, "member": m} if sc.members > 1 else p for p in member_phases)
        members.append(trainer.ema.eval().cpu())
    if not opts.dist.is_main:  # rank 0 exports and writes; the others are done once training is
        return None
    final = members[0] if len(members) == 1 else SwinEnsemble(members).eval()
    onnx_path = tmp / B.SWIN
    check = good.fields[:2].float().reshape(min(2, len(good)), -1, extractor.d_f).numpy()
    if synthetic.count("synthetic"):
        check = np.concatenate([check, synthetic.fields[:2].float().reshape(-1, *check.shape[1:]).numpy()])
    diff = export_swin(final, extractor.grid, onnx_path, check)
    supervision = "good images + synthetic anomalies"
    if opts.mode == "supervised":
        supervision += f" + {len(labelled)} defective images with pixel masks"
        if sc.finetune_objective == "resmixmatch":
            supervision += " (learned with ResMixMatch)"
        if sc.defect_transplants:
            supervision += f" (each also pasted into {sc.defect_transplants} good images)"
    elif opts.mode == "weak" and weak is not None:
        kinds = ", ".join(f"{n} {k}" for k, n in weak.counts().items() if k != "total" and n)
        supervision += f" + {len(labelled)} weakly labelled defective images ({kinds}; ResMixMatch)"
    if sc.members > 1:  # said here, not in a manifest field: swin.onnx keeps one Swin's contract, so a runtime
        # that predates ensembles serves the bundle as it is
        supervision += f"; {sc.members} Swins averaged, each with its own synthetic anomalies"
    info = B.TrainingInfo(mode=opts.mode, supervision=supervision, steps=steps, good_fields=good.count("good"),
                          synthetic_fields=n_synthetic, defect_images=labelled,
                          seconds=round(time.perf_counter() - t0, 2))
    return _TrainedSwin(final, onnx_path, diff, info, phases)


def _defect_bank(cfg: ProductConfig, mode: str, extractor: PatchFeatureExtractor, scorer: PosFARScorer,
                 defects: list[LabelledDefect], weak: LabelSet | None, weak_root: Path, swin_scale: float
                 ) -> tuple[np.ndarray, int] | None:
    """The labelled defect blocks' features (fp16, as the edge reads them) and how many images gave some: the
    masks' anomalous blocks (supervised), or the boxed images' blocks the trained Swin (``scorer``'s classifier)
    is surer of than ``BOX_BANK_LEVEL`` x its ``swin_scale`` on held-out good blocks (weak); None when
    ``scoring.defect_bank_boost`` is off, the map has no distance, or no label gave a block."""
    s = cfg.scoring
    if s.defect_bank_boost <= 0 or s.fusion == "none":
        return None
    if mode == "supervised":
        lc = cfg.labels
        features, images = defect_block_features(extractor, defects, lc.eps_pos, lc.eps_neg, lc.min_positive_px)
    elif mode == "weak" and weak is not None:
        features, images = box_block_features(extractor, scorer, weak, weak_root, BOX_BANK_LEVEL * swin_scale)
    else:
        return None
    if not len(features):
        log.warning("no label gave a defect block (masks over labels.eps_pos of a block, or boxes): no defect bank")
        return None
    return features.astype(np.float16), images


def _member_init(init: Path | None, member: int, members: int, dist: Distributed) -> Path | None:
    """The checkpoint file a member starts from (``--init``): a ``.safetensors`` file is one Swin's weights; a
    checkpoint folder (``OUT.ckpt`` of an earlier fit) holds every member's, ``unsupervised.safetensors`` and
    ``member<m>/unsupervised.safetensors``, so a several-Swin profile fine-tunes on labels without retraining.
    Told apart by name, not on disk: under torchrun the weights need to exist only where rank 0 runs."""
    if init is None:
        return None
    init = Path(init)
    if init.suffix == ".safetensors":
        if members > 1:
            raise ValueError(f"--init {init} gives one Swin's weights; swin.members is {members}: give the earlier "
                             "fit's checkpoint folder (OUT.ckpt), which holds each member's")
        return init
    path = init / f"member{member}" / "unsupervised.safetensors" if member else init / "unsupervised.safetensors"
    if not dist.enabled and not path.is_file():  # said before any work (under torchrun rank 0's read says it)
        raise ValueError(f"--init {init}: no {path.relative_to(init)} for member {member} of {members} (a checkpoint "
                         "folder of a fit with as many swin.members)")
    return path


def _train_member(cfg: ProductConfig, init: Path | None, trainer: SwinTrainer, data: ResidualSet,
                  real: ResidualSet | None, weak_set: ResidualSet | None, progress: bool) -> tuple[list[dict], int]:
    """One Swin's phases: unsupervised (unless it starts from ``init``), then fine-tuning on real defects or weak
    labels. Returns the phase reports and the number of steps trained.  ``swin.boundary_ignore`` steers the
    unsupervised phase only: fine-tuned with it too, the weak labels gained less (docs/sweeps/boundary.md)."""
    sc = cfg.swin
    phases = []
    if init is not None:
        trainer.load_weights(init)
    else:
        unsupervised = data.boundary_ignored(sc.boundary_ignore, kind="synthetic")
        phases.append(trainer.run_phase("unsupervised", unsupervised, sc.steps, sc.lr, progress=progress).to_json())
    steps = sc.steps if init is None else 0
    if real is not None:
        trainer.model.load_state_dict(trainer.ema.state_dict())  # fine-tune the unsupervised (EMA) model
        if sc.finetune_objective == "resmixmatch":
            real, objective = real.ignored_as_unknown(), _resmixmatch(cfg)
        else:
            objective = None  # the trainer's focal loss
        phases.append(trainer.run_phase("supervised", data, sc.finetune_steps, sc.finetune_lr, defects=real,
                                        progress=progress, objective=objective).to_json())
        steps += sc.finetune_steps
    if weak_set is not None:
        wc = cfg.weak
        trainer.model.load_state_dict(trainer.ema.state_dict())  # start from the unsupervised (EMA) model
        phases.append(trainer.run_phase("weak", data, wc.steps, wc.lr, defects=weak_set, progress=progress,
                                        objective=_resmixmatch(cfg)).to_json())
        steps += wc.steps
    return phases, steps


def _resmixmatch(cfg: ProductConfig) -> ResMixMatch:
    """The weak-label objective from the weak section (and the Swin's token masking / jitter)."""
    wc, sc = cfg.weak, cfg.swin
    return ResMixMatch(ResMixMatchConfig(
        augmentations=wc.augmentations, temperature=wc.temperature, mixup_alpha=wc.mixup_alpha,
        alpha_x=wc.alpha_x, alpha_u=wc.alpha_u, gamma_x=wc.gamma_x, gamma_u=wc.gamma_u, lambda_u=wc.lambda_u,
        rampup_steps=wc.rampup_steps, mask_ratio=sc.mask_ratio, jitter=sc.jitter,
        region_prior=wc.region_prior, peak_from=wc.peak_from, guess_rest=wc.guess_rest))


def fit_product(cfg: ProductConfig, data_root: Path, out: Path, progress: bool = True,
                options: TrainingOptions | None = None) -> FitSummary | None:
    """Train the bundle of one product from ``data_root/train/good`` (plus real defects when supervised).

    Under torchrun (``options.dist``) every rank runs this; rank 0 writes the bundle and returns the
    summary, the other ranks return None once their share (features, residual fields, Swin steps) is done.
    """
    opts = options or TrainingOptions()
    dist = opts.dist
    if opts.mode != "unsupervised" and not cfg.swin.enabled:
        raise ValueError(f"--mode {opts.mode} trains the Swin, but the config has swin.enabled: false")
    if dist.enabled:  # checked before any work starts
        if opts.cache_dir is not None:
            raise ValueError("--cache is for single-process experiment sweeps: leave it out under torchrun")
        if cfg.swin.enabled and cfg.swin.batch_size % dist.world_size:
            raise ValueError(f"swin.batch_size {cfg.swin.batch_size} must be a multiple of the {dist.world_size} "
                             "processes (each trains on an equal share of every batch)")
        progress = progress and dist.is_main
    out = Path(out)
    defects: list[LabelledDefect] = []
    weak: LabelSet | None = None
    weak_root = Path(opts.labels_root or data_root)
    if opts.mode == "supervised":  # checked before any work starts
        if opts.supervised_from is None:
            raise ValueError("--mode supervised needs --supervised-from DATASET (its test split gives the defects)")
        defects = pick_defects(opts.supervised_from, opts.n_defects, opts.defect_seed)
    if opts.mode == "weak":  # the whole label file is validated before any work starts
        if opts.labels is None:
            raise ValueError("--mode weak needs --labels FILE (boxes, rotated boxes, tags or blocks)")
        weak = load_labels(opts.labels, root=weak_root)
        for warning in weak.warnings:
            log.warning("%s", warning)
    torch.manual_seed(cfg.seed)
    dataset = scan_dataset(data_root)
    bank_paths, holdout_paths = split_holdout(dataset.train, cfg.threshold.holdout_fraction, cfg.seed)
    seconds: dict[str, float] = {}
    skipped: list[str] = []

    t0 = time.perf_counter()
    extractor = build_extractor(cfg.backbone, cfg.input_size, cfg.posfar.lambda_p)
    check_frame_shift(cfg.scoring.frame_shift, extractor.stride)
    if cfg.scoring.frame_shift and cfg.logical.enabled:
        raise ValueError("scoring.frame_shift with logical.enabled: the logical score is the frame's own and is not "
                         "averaged over shifted frames; use one or the other")
    fg_cfg = cfg.foreground
    foreground = (ForegroundBuilder(extractor.grid, fg_cfg.fit_images, fg_cfg.per_image, fg_cfg.quantile,
                                    seed=cfg.seed) if fg_cfg.enabled else None)
    builder = BankBuilder(cfg.posfar.coreset_ratio, cfg.posfar.projection_dim, cfg.seed, foreground=foreground)
    loaded: list[Path] = []
    cache = FitCache(opts.cache_dir) if opts.cache_dir is not None else None
    sampler = PatchSampler(cfg.logical.patches_per_image, cfg.seed) if cfg.logical.enabled else None
    for pcf, descriptor in _cached_features(cache, extractor, bank_paths, cfg, "bank images", skipped, progress,
                                            loaded, dist):
        builder.add(pcf, descriptor)
        if sampler is not None:
            sampler.add(pcf)
    fitted: FittedPosFAR = builder.build(cfg.posfar.d_l, cfg.posfar.pca_variance)
    seconds["bank"] = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        trained = None
        classifier = None
        if cfg.swin.enabled:
            t_swin = time.perf_counter()
            trained = _train_swin(cfg, opts, extractor, fitted, loaded, defects, weak, weak_root, out, tmp, skipped,
                                  progress, cache)
            if trained is not None:
                classifier = SwinClassifier(OnnxRuntimeEngine(trained.onnx_path))
            seconds["swin"] = time.perf_counter() - t_swin
        if not dist.is_main:  # thresholds, export and the bundle are rank 0's
            return None

        t1 = time.perf_counter()
        power = fg_cfg.power if fg_cfg.enabled else 0.0

        image_score = cfg.scoring.image_score
        if image_score == "distance" and classifier is None:
            image_score = "map"  # without a Swin the map is the distance
        scorer = fitted.scorer(cfg.posfar.k_references, extractor.grid, cfg.input_size, cfg.posfar.retrieval_trim,
                               cfg.scoring.blur_sigma, cfg.scoring.score_pool, tuple(cfg.posfar.thetas),
                               classifier=classifier, foreground_power=power, foreground_pool=fg_cfg.pool)
        holdout = [(p, d) for pcf, descriptor in _cached_features(cache, extractor, holdout_paths, cfg,
                                                                  "hold-out images", skipped, progress)
                   for p, d in zip(pcf, descriptor, strict=True)]
        holdout_evidence = [scorer.evidence(p, d) for p, d in holdout]
        defect_bank = defect_bank_info = None
        if trained is not None:  # boxes' blocks are those the Swin is surer of than of held-out good blocks
            swin_scale = fusion_scale([e.probability for e in holdout_evidence])
            defect_bank = _defect_bank(cfg, opts.mode, extractor, scorer, defects, weak, weak_root, swin_scale)
        if defect_bank is not None:
            features, images = defect_bank
            boost, cap = cfg.scoring.defect_bank_boost, cfg.scoring.defect_bank_cap
            scorer = scorer.with_defect_bank(DefectBank(features, boost, cap))
            defect_bank_info = B.DefectBankInfo(boost=boost, cap=cap, blocks=len(features), images=images)
            trained.info = trained.info.model_copy(update={"supervision": trained.info.supervision + (
                f"; {len(features)} labelled defect blocks raise the map's distance where a block is nearer one of "
                "them than any normal patch")})
            holdout_evidence = [replace(e, defect_factor=scorer.defect_factor(p, e.distance))
                                for e, (p, _) in zip(holdout_evidence, holdout, strict=True)]
        # bank image j, matched with itself left out of its retrieval: about 10x more good maps than the hold-out
        components = stability = None
        if sampler is not None:
            components, stability = fit_components(sampler.samples, extractor.grid, cfg.logical.k,
                                                   tuple(cfg.logical.k_candidates), cfg.seed, cfg.logical.regions)
        loo_evidence, bank_summaries = [], []
        for pcf, descriptor in _cached_features(cache, extractor, loaded, cfg, "leave-one-out scores", [], progress):
            loo_evidence.extend(scorer.evidence(p, d, exclude=len(loo_evidence))
                                for p, d in zip(pcf, descriptor, strict=True))
            if components is not None:
                bank_summaries.extend(components(p).summary for p in pcf)
        # every reference image's leave-one-out distances: always stored, so any bundle can be scored standardised;
        # scored from the fp16 values the edge will read
        standardiser = DistanceStandardiser(np.stack([e.distance.reshape(extractor.grid) for e in loo_evidence])
                                            .astype(np.float16))
        scorer = scorer.with_standardiser(standardiser, image_score)
        fusion = fusion_info = None
        if classifier is not None:  # the scales are always stored, so every map can be evaluated
            rule = cfg.scoring.fusion if cfg.scoring.fusion != "none" else "geometric"
            s = cfg.scoring
            weight = s.fusion_swin_weight
            calibrated = MapFusion.calibrate(rule, np.stack([e.map_distance for e in holdout_evidence]),
                                             np.stack([e.probability for e in holdout_evidence]), weight,
                                             s.fusion_swin_excess, s.fusion_distance_excess)
            fusion_info = B.FusionInfo(rule=rule, distance_scale=calibrated.distance_scale,
                                       swin_scale=calibrated.swin_scale, quantile=FUSION_QUANTILE,
                                       swin_weight=None if weight == B.DEFAULT_SWIN_WEIGHT else weight,
                                       # absent when off: the bundle keeps its schema
                                       swin_excess=s.fusion_swin_excess or None,
                                       distance_excess=s.fusion_distance_excess or None)
            if cfg.scoring.fusion != "none":
                fusion = calibrated
                scorer = scorer.with_fusion(fusion)
        holdout_scored = [scorer.finish(e) for e in holdout_evidence]
        loo = cfg.threshold.leave_one_out
        if loo == "auto":  # the Swin was trained on the bank images' fields: their scores by it run optimistic
            loo = classifier is None or image_score != "map"
        loo_scored = [scorer.finish(e) for e in loo_evidence] if loo else []
        if cfg.scoring.frame_shift:  # the thresholds on the scores the edge computes: each the mean of four frames
            holdout_scored = _shift_averaged(holdout_scored, scorer, extractor, cache, holdout_paths, cfg, progress,
                                             leave_one_out=False)
            loo_scored = _shift_averaged(loo_scored, scorer, extractor, cache, loaded, cfg, progress,
                                         leave_one_out=True) if loo_scored else []
        logical_info = logical_arrays = None
        if components is not None:  # the verdict fuses the structural score with the logical one
            model, bank_logical, holdout_logical = fit_logical(
                components, np.stack(bank_summaries), np.stack([components(p).summary for p, _ in holdout]),
                cfg.logical.shrinkage, cfg.seed)
            structural = Standardisation.fit([s.score for s in holdout_scored + loo_scored])
            logical_std = Standardisation.fit(np.concatenate([holdout_logical, bank_logical]))
            scorer = scorer.with_logical(LogicalScoring(components, model, structural, logical_std,
                                                        cfg.logical.fusion, cfg.logical.weight))
            # the good images' fused scores, each with a logical score from a model that did not see it
            holdout_scored = [scorer.finish(replace(e, logical_score=float(v), component_areas=None))
                              for e, v in zip(holdout_evidence, holdout_logical, strict=True)]
            if loo:
                loo_scored = [scorer.finish(replace(e, logical_score=float(v), component_areas=None))
                              for e, v in zip(loo_evidence, bank_logical, strict=True)]
            logical_info = B.LogicalInfo(k=components.k, regions=components.regions, rule=cfg.logical.fusion,
                                         weight=cfg.logical.weight, structural_mean=structural.mean,
                                         structural_std=structural.std, logical_mean=logical_std.mean,
                                         logical_std=logical_std.std,
                                         stability={str(k): round(v, 4) for k, v in stability.items()}
                                         if stability else None)
            logical_arrays = {"component_centres": components.centres, "logical_mean": model.mean,
                              "logical_precision": model.precision, "logical_group_stats": model.group_stats}
        holdout_scores = [s.score for s in holdout_scored]
        loo_scores = [s.score for s in loo_scored]
        choice = estimate_threshold(holdout_scores + loo_scores, cfg.threshold.target_false_reject,
                                    cfg.threshold.margin, n_leave_one_out=len(loo_scores))
        pixel_choice = None  # the verdict is not on the heatmap: its regions need a threshold on its own scale
        if image_score != "map":
            pixel_choice = estimate_threshold([s.map_score for s in holdout_scored + loo_scored],
                                              cfg.threshold.target_false_reject, cfg.threshold.margin,
                                              n_leave_one_out=len(loo_scored))
        holdout_check = {"n_holdout_images": len(holdout_scores),
                         "holdout_above_threshold": int(sum(s >= choice.threshold for s in holdout_scores)),
                         "holdout_quantile": float(np.quantile(holdout_scores, 1 - cfg.threshold.target_false_reject,
                                                               method="higher")),
                         "loo_quantile": (float(np.quantile(loo_scores, 1 - cfg.threshold.target_false_reject,
                                                            method="higher")) if loo_scores else None)}
        seconds["threshold"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        onnx_path = tmp / B.BACKBONE
        diff = export_backbone(extractor, onnx_path)
        sc = cfg.swin
        swin_info = None
        files = {B.BACKBONE: onnx_path}
        matcher = write_matcher_graph(tmp / B.MATCHER, scorer.bank, scorer.references, cfg.posfar.k_references,
                                      tuple(cfg.posfar.thetas), extractor.grid[0] * extractor.grid[1])
        if matcher is not None:
            files[B.MATCHER] = matcher
        else:
            log.info("no %s: the bank has not the per-image layout or fewer images than K", B.MATCHER)
        if trained is not None:
            swin_info = B.SwinInfo(embed_dim=sc.embed_dim, depth=sc.depth, heads=sc.heads, window=sc.window,
                                   mlp_ratio=sc.mlp_ratio, train_window=sc.train_window,
                                   window_stride=sc.window_stride, position_embedding=sc.position_embedding,
                                   log_input=sc.log_input, magnitude_skip=sc.magnitude_skip,
                                   onnx_max_abs_diff=trained.onnx_diff)
            files[B.SWIN] = trained.onnx_path
        scoring = B.ScoringInfo(anomaly_map=("fused" if fusion else "swin") if trained else "nn_distance",
                                blur_sigma=cfg.scoring.blur_sigma, score_pool=cfg.scoring.score_pool,
                                fusion=fusion_info, image_score=image_score,
                                refine=_refine_info(cfg.scoring.refine),
                                frame_shift=cfg.scoring.frame_shift or None, defect_bank=defect_bank_info)
        manifest = B.Manifest(
            # the oldest schema that holds every section this bundle has, so older runtimes still read the rest
            schema_version=max([B.SCHEMA_VERSION, B.LOGICAL_SCHEMA_VERSION if logical_info is not None else 0]
                               + [version for _, version in scoring.versioned_sections()]),
            product=cfg.product,
            bundle_version=time.strftime("%Y%m%d-%H%M%S"),
            created_at=B.now_iso(),
            producer=producer_versions(),
            preprocessing=B.Preprocessing(input_size=cfg.input_size, mean=tuple(extractor.mean.flatten().tolist()),
                                          std=tuple(extractor.std.flatten().tolist())),
            backbone=B.BackboneInfo(name=cfg.backbone.name, layers=cfg.backbone.layers, d_f=extractor.d_f,
                                    grid=extractor.grid, stride=extractor.stride,
                                    descriptor_grid=extractor.descriptor_grid,
                                    descriptor_channels=extractor.descriptor_channels,
                                    lambda_p=cfg.posfar.lambda_p),
            posfar=B.PosFARInfo(d_l=fitted.pca.dim, k_references=cfg.posfar.k_references,
                                retrieval_trim=cfg.posfar.retrieval_trim, thetas=cfg.posfar.thetas,
                                coreset_ratio=cfg.posfar.coreset_ratio,
                                n_reference_images=int(fitted.descriptors.shape[0]),
                                n_bank=int(fitted.bank.shape[0])),
            scoring=scoring,
            thresholds=B.Thresholds.from_estimate(choice, pixel_choice),
            latency_budget_ms=cfg.latency_budget_ms,
            swin=swin_info,
            foreground=(B.ForegroundInfo(power=fg_cfg.power, pool=fg_cfg.pool,
                                         n_fit_images=min(fg_cfg.fit_images, builder.n_images))
                        if fitted.foreground_maps is not None else None),
            training=trained.info if trained else None,
            logical=logical_info,
        )
        bank_arrays = {"defect_bank": defect_bank[0]} if defect_bank is not None else {}
        B.write_bundle(out, manifest, files, {**fitted.arrays(), **standardiser.arrays(), **(logical_arrays or {}),
                                              **bank_arrays})
    seconds["export"] = time.perf_counter() - t2
    precision: list[str] = []
    if cfg.export.int8:  # gated int8 twins of the graphs, measured against fp32 on data_root/test
        from training_host.models.quantize import quantize_bundle

        t3 = time.perf_counter()
        precision = quantize_bundle(Path(out), data_root, n_calibration=cfg.export.calibration_images).lines()
        seconds["int8"] = time.perf_counter() - t3
    seconds["total"] = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    swin_summary = None
    if trained is not None:
        swin_summary = {"onnx_max_abs_diff": trained.onnx_diff, "phases": trained.phases,
                        **trained.info.model_dump(exclude={"defect_images"}),
                        "defect_images": [d.name for d in trained.info.defect_images]}
    return FitSummary(bundle=out, n_train=builder.n_images, n_holdout=len(holdout_scores),
                      n_bank=int(fitted.bank.shape[0]), d_f=extractor.d_f, d_l=fitted.pca.dim,
                      threshold=choice.threshold, onnx_max_abs_diff=diff, bundle_bytes=size,
                      anomaly_map=manifest.scoring.anomaly_map, swin=swin_summary,
                      foreground=fitted.foreground_maps is not None,
                      seconds={k: round(v, 2) for k, v in seconds.items()}, skipped=skipped,
                      threshold_estimate={**choice.to_json(), **holdout_check}, precision=precision)
