"""The residual Swin: window mechanics, sliding windows, losses, augmentation, training, resume, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training_host.config import SwinConfig
from training_host.models.swin import (
    ResidualSwin,
    SwinEnsemble,
    SwinShape,
    _shift_mask,
    _window_merge,
    _window_partition,
    focal_loss,
    mask_and_jitter,
    region_balanced_weights,
)
from training_host.training.residual_data import ResidualSet
from training_host.training.train_swin import CheckpointError, SwinTrainer


def _model(**kw) -> ResidualSwin:
    torch.manual_seed(0)
    return ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2, **kw)).eval()


def test_window_partition_round_trip_and_shift_mask():
    x = torch.arange(2 * 16 * 24 * 3, dtype=torch.float32).reshape(2, 16, 24, 3)
    windows = _window_partition(x, 8)
    assert windows.shape == (2 * 2 * 3, 64, 3)
    assert torch.equal(windows[0, 9], x[0, 1, 1])  # token (1, 1) of the first window
    assert torch.equal(_window_merge(windows, 8, 2, 16, 24), x)
    mask = _shift_mask(16, 16, 8, 4)
    assert mask.shape == (4, 64, 64)
    assert float(mask[0].abs().sum()) == 0.0  # the top-left window holds one region after the shift
    assert float((mask[3] < 0).float().mean()) > 0.5  # the bottom-right one mixes four regions
    # masked pairs get a negligible weight: together below float32's resolution of the softmax's sum (the same
    # figures as an exact zero), and never a subnormal one (slow on CPUs), also where ONNX Runtime clamps exp()'s
    # argument at -88.4 (swin.MASKED)
    logits = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 5  # rows spread over up to ~35
    weights = torch.softmax(logits + mask[3], dim=-1)
    masked = mask[3] < 0
    assert float((weights * masked).sum(-1).max()) < 2.0**-25
    assert not bool(((weights > 0) & (weights < torch.finfo(torch.float32).tiny)).any())
    shifted = logits + mask[3] - logits.max(-1, keepdim=True).values  # what exp() gets
    assert float(shifted[masked].min()) > -87.33  # above the clamp, and e^-87.33 ~ 1.18e-38 is a normal float32


def test_shifted_windows_let_information_cross_window_borders():
    """With depth 2 the second (shifted) block mixes tokens of neighbouring windows; depth 1 cannot."""
    for depth, crosses in ((1, False), (2, True)):
        torch.manual_seed(0)
        model = ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=depth, heads=2)).eval()
        field = torch.rand(1, 16, 16, 12)
        changed = field.clone()
        changed[0, 7, 7] += 5.0  # inside the top-left window, next to its border
        with torch.no_grad():
            delta = (model.logits(changed) - model.logits(field)).abs().sum(-1)[0]
        assert bool(delta[8, 8] > 1e-6) == crosses  # (8, 8) sits in the bottom-right window
        assert float(delta[0:8, 8:].sum() + delta[8:, 0:8].sum() > 1e-6) == crosses


def test_forward_is_the_softmax_on_small_grids_and_averages_sliding_windows_on_large_ones():
    model = _model(train_window=16, window_stride=8, grid=(24, 32))
    small = torch.rand(2, 16, 16, 12)
    with torch.no_grad():
        assert torch.allclose(model(small), model.logits(small).softmax(-1)[..., 1])
        big = torch.rand(1, 24, 32, 12)
        prob = model(big)
        total = torch.zeros(1, 24, 32)
        count = torch.zeros(1, 24, 32)
        for top in (0, 8):
            for left in (0, 8, 16):
                # each window sees its own slice of the absolute position embedding
                p = model.logits(big[:, top : top + 16, left : left + 16], (top, left)).softmax(-1)[..., 1]
                total[:, top : top + 16, left : left + 16] += p
                count[:, top : top + 16, left : left + 16] += 1
    assert prob.shape == (1, 24, 32)
    assert torch.allclose(prob, total / count, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the window"):
        model.logits(torch.rand(1, 12, 16, 12))
    with pytest.raises(ValueError, match="exceeds the model's grid"):
        model.logits(torch.rand(1, 16, 16, 12), (16, 0))


def test_position_embedding_makes_the_same_residual_score_differently_by_place():
    torch.manual_seed(0)
    model = _model(grid=(16, 16))
    with torch.no_grad():
        model.pos_embed.normal_(0, 1.0)
        field = torch.ones(1, 16, 16, 12)
        prob = model(field)[0]
    assert float(prob.std()) > 1e-3  # constant input, position-dependent output
    plain = _model()
    with torch.no_grad():
        flat = plain(torch.ones(1, 8, 8, 12))[0]  # one window, no shift, no position: all tokens alike
    assert float(flat.std()) < 1e-5


def test_an_ensemble_averages_its_members_and_refuses_mixed_shapes():
    a, b = _model(), ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2)).eval()
    field = torch.rand(2, 8, 8, 12)
    with torch.no_grad():
        assert torch.allclose(SwinEnsemble([a, b])(field), (a(field) + b(field)) / 2, atol=1e-6)
        assert torch.allclose(SwinEnsemble([a])(field), a(field))
    with pytest.raises(ValueError, match="same shape"):
        SwinEnsemble([a, ResidualSwin(SwinShape(in_dim=12, embed_dim=8, depth=2, heads=2))])
    with pytest.raises(ValueError, match="same shape"):
        SwinEnsemble([])


def test_focal_loss_ignores_unlabelled_tokens_and_reduces_to_cross_entropy():
    logits = torch.randn(4, 8, 8, 2)
    labels = torch.randint(0, 2, (4, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
    assert torch.allclose(focal_loss(logits, labels, alpha=0.5, gamma=0.0), 0.5 * ce, atol=1e-6)
    ignored = labels.clone()
    ignored[:2] = -1
    expect = 0.5 * torch.nn.functional.cross_entropy(logits[2:].reshape(-1, 2), labels[2:].reshape(-1))
    assert torch.allclose(focal_loss(logits, ignored, 0.5, 0.0), expect, atol=1e-6)
    assert float(focal_loss(logits, torch.full_like(labels, -1), 0.5, 2.0)) == 0.0
    # gamma > 0 down-weights well-classified tokens
    easy = torch.tensor([[4.0, -4.0]]).expand(10, 2)
    focal, plain = focal_loss(easy, torch.zeros(10), 0.5, 2.0), focal_loss(easy, torch.zeros(10), 0.5, 0.0)
    assert float(focal) < 1e-3 * float(plain)


def test_region_balanced_weights_give_each_region_its_share_and_keep_the_anomalous_total():
    labels = torch.zeros(2, 12, 12, dtype=torch.long)
    labels[0, :6, :6] = 1  # a band of 36 blocks
    labels[0, 9, 9] = 1  # a pit of one block
    labels[0, 10, 10] = 1  # ... touching it diagonally: one region of two (8-connected)
    labels[0, 0, 11] = -1  # ignored
    labels[1, 8:10, 2:4] = 1  # another field's region of 4
    positive = labels == 1
    assert torch.equal(region_balanced_weights(labels, 0.0), torch.ones(2, 12, 12))  # off: the plain loss
    for power in (0.5, 1.0):
        w = region_balanced_weights(labels, power)
        assert float(w[positive].sum()) == pytest.approx(float(positive.sum()))  # class balance as before
        assert torch.all(w[~positive] == 1.0)
        band, pit, other = w[0, 0, 0], w[0, 9, 9], w[1, 8, 2]
        assert float(w[0, 10, 10]) == pytest.approx(float(pit))  # one region, one weight
        assert float(pit / band) == pytest.approx((36 / 2) ** power, rel=1e-5)
        assert float(other / band) == pytest.approx((36 / 4) ** power, rel=1e-5)
    regions = [float(w[0, :6, :6].sum()), float(w[0, 9, 9] + w[0, 10, 10]), float(w[1, 8:10, 2:4].sum())]
    assert max(regions) == pytest.approx(min(regions), rel=1e-5)  # power 1: every region weighs the same
    none = torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.equal(region_balanced_weights(none, 1.0), torch.ones(1, 4, 4))  # no anomalous block: unchanged


def test_focal_loss_token_weights_scale_each_token_term():
    logits = torch.randn(2, 4, 4, 2)
    labels = torch.randint(0, 2, (2, 4, 4))
    labels[0, 0, 0] = -1
    plain = focal_loss(logits, labels, 0.5, 2.0)
    assert torch.allclose(focal_loss(logits, labels, 0.5, 2.0, torch.ones(2, 4, 4)), plain)
    doubled = focal_loss(logits, labels, 0.5, 2.0, torch.full((2, 4, 4), 2.0))
    assert torch.allclose(doubled, 2 * focal_loss(logits, labels, 0.5, 2.0))
    only_first = torch.zeros(2, 4, 4)
    only_first[0] = 1.0
    first = labels.clone()
    first[1] = -1
    n_all, n_first = int((labels >= 0).sum()), int((first >= 0).sum())
    assert torch.allclose(focal_loss(logits, labels, 0.5, 2.0, only_first) * n_all / n_first,
                          focal_loss(logits, first, 0.5, 2.0), atol=1e-6)


def test_mask_and_jitter_is_seeded_and_masks_the_asked_share():
    field = torch.ones(8, 32, 32, 4)
    a = mask_and_jitter(field, 0.2, 0.1, torch.Generator().manual_seed(1))
    b = mask_and_jitter(field, 0.2, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    zero = (a.abs().sum(-1) == 0).float().mean()
    assert 0.17 < float(zero) < 0.23
    kept = a[a.abs().sum(-1) > 0]
    assert float(kept.std()) > 0.05  # jittered
    assert torch.equal(mask_and_jitter(field, 0.0, 0.0, torch.Generator()), field)


def _toy_set(n: int = 48, seed: int = 0) -> ResidualSet:
    """Residual fields where anomalous blocks carry a blob of large residuals, as a defect does."""
    g = torch.Generator().manual_seed(seed)
    fields = torch.rand(n, 16, 16, 12, generator=g) * 0.5
    labels = torch.zeros(n, 16, 16, dtype=torch.int8)
    for i in range(n // 2, n):
        r, c = (int(v) for v in torch.randint(1, 13, (2,), generator=g))
        fields[i, r : r + 3, c : c + 3] += 2.0
        labels[i, r : r + 3, c : c + 3] = 1
    return ResidualSet(fields.half(), labels, ["good"] * (n // 2) + ["synthetic"] * (n - n // 2))


def _cfg(**kw) -> SwinConfig:
    base = dict(batch_size=8, lr=3e-3, warmup_steps=5, ema=0.9, checkpoint_every=10, mask_ratio=0.05, jitter=0.05)
    return SwinConfig.model_validate({**base, **kw})


def test_training_learns_to_find_large_residual_blobs():
    train, test = _toy_set(seed=0), _toy_set(seed=1)
    model = ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2, train_window=16))
    model.set_input_scale(train.fields.float())
    trainer = SwinTrainer(model, _cfg(), seed=0)
    report = trainer.run_phase("unsupervised", train, steps=200, lr=3e-3, progress=False)
    assert report.losses[-1][1] < report.losses[0][1]
    with torch.no_grad():
        prob = trainer.ema(test.fields.float())
    from training_host.evaluation.metrics import roc_auc

    labels = (test.labels == 1).reshape(-1).numpy()
    assert roc_auc(labels, prob.reshape(-1).numpy()) > 0.97  # blocks ranked right on unseen fields
    assert float(prob[test.labels == 1].mean()) > 2 * float(prob[test.labels == 0].mean())


def _fresh(data: ResidualSet) -> ResidualSwin:
    torch.manual_seed(0)
    m = ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2, train_window=16))
    m.set_input_scale(data.fields.float())
    return m


class _Killed(Exception):
    pass


def test_a_run_killed_mid_phase_resumes_to_the_same_weights(tmp_path):
    data = _toy_set(n=16)
    straight = SwinTrainer(_fresh(data), _cfg(), tmp_path / "straight", seed=3)
    straight.run_phase("unsupervised", data, steps=20, lr=1e-3, progress=False)

    killed = SwinTrainer(_fresh(data), _cfg(), tmp_path / "killed", seed=3)
    real_save = killed._save

    def save_then_die(*args):
        real_save(*args)
        raise _Killed  # the process dies right after its step-10 checkpoint

    killed._save = save_then_die
    with pytest.raises(_Killed):
        killed.run_phase("unsupervised", data, steps=20, lr=1e-3, progress=False)

    resumed = SwinTrainer(_fresh(data), _cfg(), tmp_path / "killed", seed=3, resume=True)
    report = resumed.run_phase("unsupervised", data, steps=20, lr=1e-3, progress=False)
    assert report.resumed_at == 10 and report.losses[-1][0] == 20
    for (name, a), b in zip(resumed.ema.state_dict().items(), straight.ema.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_finished_phase_is_not_trained_again(tmp_path):
    data = _toy_set(n=16)
    first = SwinTrainer(_fresh(data), _cfg(), tmp_path, seed=3)
    first.run_phase("unsupervised", data, steps=10, lr=1e-3, progress=False)
    again = SwinTrainer(_fresh(data), _cfg(), tmp_path, seed=3, resume=True)
    report = again.run_phase("unsupervised", data, steps=10, lr=1e-3, progress=False)
    assert report.resumed_at == 10
    for a, b in zip(again.ema.state_dict().values(), first.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    data = _toy_set(n=8)
    SwinTrainer(_model(), _cfg(), tmp_path, seed=0).run_phase("unsupervised", data, 10, 1e-3, progress=False)
    other = ResidualSwin(SwinShape(in_dim=12, embed_dim=32, depth=2, heads=2))
    with pytest.raises(CheckpointError, match="checkpoint is for"):
        SwinTrainer(other, _cfg(), tmp_path, resume=True).run_phase("unsupervised", data, 10, 1e-3, progress=False)
    with pytest.raises(CheckpointError, match="does not fit"):
        SwinTrainer(other, _cfg()).load_weights(tmp_path / "unsupervised.safetensors")


def test_exported_swin_matches_torch_through_the_edge_classifier(tmp_path):
    from edge_runtime.core.engines import OnnxRuntimeEngine
    from edge_runtime.core.pipeline import SwinClassifier
    from training_host.models.export import export_swin

    model = _model(train_window=16)
    fields = np.random.default_rng(0).random((3, 256, 12), dtype=np.float32)
    diff = export_swin(model, (16, 16), tmp_path / "swin.onnx", fields)
    assert diff < 1e-5
    classifier = SwinClassifier(OnnxRuntimeEngine(tmp_path / "swin.onnx"))
    with torch.no_grad():
        expect = model(torch.from_numpy(fields[1]).reshape(1, 16, 16, 12)).reshape(-1).numpy()
    got = classifier(fields[1])
    assert got.shape == (256,) and np.abs(got - expect).max() < 1e-5


def test_a_model_exported_before_it_ever_ran_still_runs_eagerly(tmp_path):
    """``fit --init`` exports a model straight from its checkpoint: the tracer must not leave its own tensors in
    the shift-mask cache for later eager calls (they failed with 'numpy() is not supported for tensor subclasses')."""
    from training_host.models import swin
    from training_host.models.export import export_swin

    swin._cached_shift_mask.cache_clear()
    model = _model(train_window=16)
    fields = np.random.default_rng(1).random((2, 256, 12), dtype=np.float32)
    assert export_swin(model, (16, 16), tmp_path / "swin.onnx", fields) < 1e-5
    assert type(swin._shift_mask(16, 16, model.shape.window, model.shape.window // 2)) is torch.Tensor
