"""ResMixMatch: sharpening, label guessing, MixUp and the ramped two-part loss, and that it learns from boxes."""

from __future__ import annotations

import torch

from training_host.config import SwinConfig
from training_host.models.swin import ResidualSwin, SwinShape
from training_host.training.residual_data import ResidualSet
from training_host.training.resmixmatch import (
    UNKNOWN,
    ResMixMatch,
    ResMixMatchConfig,
    _beta,
    bag_peaks_anomalous,
    sharpen,
    unknown_regions,
)
from training_host.training.train_swin import SwinTrainer


def test_sharpen_and_beta():
    p = torch.tensor([0.1, 0.5, 0.8])
    s = sharpen(p, 0.5)
    assert torch.allclose(s, torch.tensor([0.01 / 0.82, 0.5, 0.64 / 0.68]), atol=1e-4)
    assert torch.allclose(sharpen(p, 1.0), p, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draws = [_beta(0.75, g1) for _ in range(2000)]
    assert draws[:5] == [_beta(0.75, g2) for _ in range(5)]
    mean = sum(draws) / len(draws)
    var = sum((d - mean) ** 2 for d in draws) / len(draws)
    assert abs(mean - 0.5) < 0.03 and abs(var - 0.75 * 0.75 / (1.5**2 * 2.5)) < 0.02  # Beta(a, a) moments


def test_lambda_u_ramps_linearly():
    obj = ResMixMatch(ResMixMatchConfig(lambda_u=5.0, rampup_steps=400))
    assert obj.lambda_u(0) == 0.0 and obj.lambda_u(200) == 2.5 and obj.lambda_u(1000) == 5.0


def _quiet_fields(n: int, seed: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n 16x16 fields of small residuals, all blocks normal and none a defect yet, and the generator that drew them
    (the callers mark their defects with it)."""
    g = torch.Generator().manual_seed(seed)
    fields = torch.rand(n, 16, 16, 12, generator=g) * 0.5
    return g, fields, torch.zeros(n, 16, 16, dtype=torch.int8), torch.zeros(n, 16, 16, dtype=torch.bool)


def _weak_set(n: int, seed: int) -> tuple[ResidualSet, torch.Tensor]:
    """Fields with a blob of large residuals; labels as a box would give: blocks in a 6x6 box around the blob
    unknown (UNKNOWN), all others normal (0).  Returns the set and the true blob mask."""
    g, fields, labels, truth = _quiet_fields(n, seed)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(2, 11, (2,), generator=g))
        fields[i, r : r + 2, c : c + 2] += 2.0
        truth[i, r : r + 2, c : c + 2] = True
        labels[i, r - 2 : r + 4, c - 2 : c + 4] = UNKNOWN
    return ResidualSet(fields.half(), labels, ["weak"] * n), truth


def test_learns_where_inside_the_boxes_the_anomaly_is():
    """No block is ever labelled anomalous: only the guessing inside the boxes can find the blobs, helped by
    a short start on fully labelled synthetic fields (as training starts from the unsupervised model)."""
    from training_host.evaluation.metrics import roc_auc

    weak, _ = _weak_set(32, 0)
    g = torch.Generator().manual_seed(5)
    synth_f = torch.rand(16, 16, 16, 12, generator=g) * 0.5
    synth_l = torch.zeros(16, 16, 16, dtype=torch.int8)
    for i in range(16):
        r, c = (int(v) for v in torch.randint(0, 14, (2,), generator=g))
        synth_f[i, r : r + 2, c : c + 2] += 1.0  # fainter than the real blobs
        synth_l[i, r : r + 2, c : c + 2] = 1
    synth = ResidualSet(synth_f.half(), synth_l, ["synthetic"] * 16)
    torch.manual_seed(0)
    model = ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2, train_window=16))
    model.set_input_scale(weak.fields.float())
    cfg = SwinConfig.model_validate({"batch_size": 8, "warmup_steps": 5, "ema": 0.9, "checkpoint_every": 1000})
    trainer = SwinTrainer(model, cfg, seed=0)
    trainer.run_phase("unsupervised", synth, steps=60, lr=3e-3, progress=False)
    trainer.model.load_state_dict(trainer.ema.state_dict())
    data = ResidualSet.concat([weak, synth])
    objective = ResMixMatch(ResMixMatchConfig(rampup_steps=20))
    report = trainer.run_phase("weak", data, steps=80, lr=1e-3, progress=False, objective=objective)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in report.losses)
    test, truth = _weak_set(16, 1)
    with torch.no_grad():
        prob = trainer.ema(test.fields.float())
    inside = test.labels == UNKNOWN  # the boxes: the question is whether the blob is found within them
    assert roc_auc(truth[inside].numpy(), prob[inside].numpy()) > 0.9
    # the guessing lifted the blobs well above the rest of their boxes (before this phase: 0.17 vs 0.16)
    assert float(prob[truth].mean()) > 2 * float(prob[inside & ~truth].mean())


def test_soft_focal_loss_is_the_focal_loss_on_hard_targets_and_minimal_at_the_target():
    from training_host.models.swin import focal_loss, soft_focal_loss

    logits = torch.randn(200, 2)
    hard = torch.randint(0, 2, (200,))
    ones = torch.ones(200)
    assert torch.allclose(soft_focal_loss(logits, hard.float(), ones, 0.25, 4.0), focal_loss(logits, hard, 0.25, 4.0),
                          atol=1e-6)
    # one token with soft target 0.3: the loss over p is minimal at p = 0.3 whatever alpha and gamma
    for alpha, gamma in ((0.75, 4.0), (0.25, 2.0), (0.5, 0.0)):
        ps = torch.linspace(0.01, 0.99, 99)
        logit = torch.log(ps / (1 - ps))
        losses = [float(soft_focal_loss(torch.stack([torch.zeros(1), lg[None]], -1), torch.tensor([0.3]),
                                        torch.ones(1), alpha, gamma)) for lg in logit]
        assert abs(float(ps[int(torch.tensor(losses).argmin())]) - 0.3) < 0.02


def test_without_bags_each_unknown_region_is_one_bag():
    """Two boxes in one field and a tagged field: the most anomalous-looking block of each connected unknown
    region is guessed anomalous; everything else keeps its guess."""
    probs = torch.full((3, 6, 6), 0.1)
    unknown = torch.zeros(3, 6, 6, dtype=torch.bool)
    unknown[0, 0:2, 0:2] = True
    probs[0, 0, 1] = 0.4
    unknown[0, 4:6, 3:6] = True
    probs[0, 5, 5] = 0.2
    unknown[1] = True  # a tag: the whole field
    probs[1, 3, 3] = 0.5
    probs[2, 1, 1] = 0.9  # known blocks only: untouched
    guessed = sharpen(probs, 0.5)
    bags = unknown_regions(unknown)
    assert bags.shape == (3, 2, 6, 6) and int(bags[2].sum()) == 0
    out = bag_peaks_anomalous(probs, guessed, bags)
    lifted = torch.zeros(3, 6, 6, dtype=torch.bool)
    lifted[0, 0, 1] = lifted[0, 5, 5] = lifted[1, 3, 3] = True
    assert torch.all(out[lifted] == 1.0)
    assert torch.equal(out[~lifted], guessed[~lifted])


def test_bags_lift_their_top_k_and_may_rank_their_blocks_each_their_own_way():
    probs = torch.zeros(1, 4, 4)
    probs[0, 0] = torch.tensor([0.9, 0.8, 0.7, 0.1])
    bags = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    bags[0, 0, 0] = 2  # row 0, top-2
    bags[0, 1, :, 3] = 1  # column 3: its peak is (0, 3) at 0.1, the rest 0
    bags[0, 2, 3, 0] = 5  # one block, k larger than the bag: only that block
    out = bag_peaks_anomalous(probs, torch.zeros(1, 4, 4), bags)
    assert {tuple(i) for i in torch.nonzero(out[0]).tolist()} == {(0, 0), (0, 1), (0, 3), (3, 0)}
    per_bag = torch.zeros(1, 3, 4, 4)
    per_bag[0, 0, 0, 2] = per_bag[0, 0, 0, 3] = 1.0  # row 0 ranked differently: (0, 2), (0, 3)
    out = bag_peaks_anomalous(per_bag, torch.zeros(1, 4, 4), bags)
    assert {tuple(i) for i in torch.nonzero(out[0]).tolist()} >= {(0, 2), (0, 3)}
    assert float(out[0, 0, 0]) == 0.0


def test_peak_from_model_plus_residual_picks_the_block_the_residual_points_at():
    """A thin defect the model cannot see yet: with peak_from model+residual the bag's peak follows the residual."""
    torch.manual_seed(0)
    model = ResidualSwin(SwinShape(in_dim=4, embed_dim=8, depth=2, heads=2, train_window=8, window=4))
    x = torch.full((1, 8, 8, 4), 0.1)
    x[0, 3, 5] = 5.0
    y = torch.zeros(1, 8, 8, dtype=torch.int8)
    y[0, 2:5, 2:7] = UNKNOWN
    bags = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    bags[0, 0, 3, 2:7] = 1
    cfg = dict(mixup_alpha=0.0, mask_ratio=0.0, jitter=0.0)
    _, guessed, peaks = ResMixMatch(ResMixMatchConfig(peak_from="model+residual", **cfg)).guess(
        model, x, y, (0, 0), torch.Generator().manual_seed(0), bags)
    assert float(guessed[0, 3, 5]) == 1.0
    assert int((guessed[0, 3] == 1.0).sum()) == 1
    assert torch.equal(torch.nonzero(peaks), torch.tensor([[0, 3, 5]]))


def _spy_on_logits(model: ResidualSwin) -> dict:
    """Wrap ``model.logits`` so the last logits computed with gradients land in the returned dict (key "logits"),
    keeping their gradient after ``backward()``."""
    seen: dict = {}
    original = model.logits

    def spy(field, offset):
        out = original(field, offset)
        if torch.is_grad_enabled():
            out.retain_grad()
            seen["logits"] = out
        return out

    model.logits = spy
    return seen


def test_ignored_blocks_are_neither_known_nor_guessed():
    """-1 (the band around a synthetic mask) enters neither loss: the loss does not depend on the fields
    there, while the same blocks labelled anomalous do count."""
    torch.manual_seed(0)
    model = ResidualSwin(SwinShape(in_dim=4, embed_dim=8, depth=2, heads=2, train_window=8, window=4))
    x = torch.rand(2, 8, 8, 4)
    y = torch.zeros(2, 8, 8, dtype=torch.int8)
    y[0, 2:4, 2:4] = UNKNOWN
    y[1, 5:7, 5:7] = -1
    obj = ResMixMatch(ResMixMatchConfig(mixup_alpha=0.0, rampup_steps=0, mask_ratio=0.0, jitter=0.0))
    # the window attention mixes tokens, so check the gradient of the loss w.r.t. the logits instead:
    logits_seen = _spy_on_logits(model)
    loss = obj(model, x, y, (0, 0), 10, torch.Generator().manual_seed(1))
    loss.backward()
    grad = logits_seen["logits"].grad
    assert float(grad[1, 5:7, 5:7].abs().sum()) == 0.0  # ignored blocks: no gradient
    assert float(grad[0, 2:4, 2:4].abs().sum()) > 0.0  # unknown blocks: guessed targets count
    assert float(grad[1, 0:2, 0:2].abs().sum()) > 0.0  # known normal blocks count


def test_bags_travel_with_their_fields_through_batches_crops_and_flips():
    """Each weak field's bags arrive in the batch on the same rows as the field and are cropped and flipped with
    it; a bag a crop cuts is dropped (its defect may lie outside the window); good fields have none."""
    n, grid = 4, 12
    fields = torch.zeros(n, grid, grid, 3)
    bags = torch.zeros(n, 2, grid, grid, dtype=torch.uint8)
    for i in range(n):
        fields[i, 2 * i, 4:8, 0] = 1.0  # field i is marked on row 2i, columns 4-7...
        bags[i, 0, 2 * i, 4:8] = 1  # ...and so is its bag 0, inside every 8 x 8 crop of the 12 x 12 grid
        bags[i, 1] = 1  # bag 1 covers the whole field: every crop cuts it
    weak = ResidualSet(fields.half(), torch.full((n, grid, grid), UNKNOWN, dtype=torch.int8), ["weak"] * n, bags)
    good = ResidualSet(torch.zeros(6, grid, grid, 3).half(), torch.zeros(6, grid, grid, dtype=torch.int8),
                       ["good"] * 6)
    model = ResidualSwin(SwinShape(in_dim=3, embed_dim=8, depth=2, heads=2, train_window=8, window=4))
    trainer = SwinTrainer(model, SwinConfig.model_validate({"batch_size": 6, "defect_fraction": 0.5}), seed=0)
    inside = outside = 0
    for step in range(30):
        x, _, b, _, _ = trainer._batch(good, weak, step)
        assert b is not None and b.shape == (6, 2, 8, 8)
        assert int(b[:3].sum()) == 0 and int(b[:, 1].sum()) == 0  # good rows: no bags; the whole-field bag: cut
        for j in range(3, 6):
            marked = x[j, ..., 0] > 0
            if marked.any():
                assert torch.equal(b[j, 0] > 0, marked)
                inside += 1
            else:  # the marked row lies outside the crop: its bag is dropped
                assert int(b[j, 0].sum()) == 0
                outside += 1
    assert inside and outside
    both = ResidualSet.concat([good, weak])
    assert both.bags is not None and both.bags.shape == (10, 2, grid, grid) and int(both.bags[:6].sum()) == 0
    assert torch.equal(both.select("weak").bags, bags)


def test_with_guess_rest_off_only_the_peaks_of_the_bags_are_learned():
    torch.manual_seed(0)
    model = ResidualSwin(SwinShape(in_dim=4, embed_dim=8, depth=2, heads=2, train_window=8, window=4))
    x = torch.rand(1, 8, 8, 4)
    y = torch.full((1, 8, 8), UNKNOWN, dtype=torch.int8)  # a tagged field: every block unknown
    bags = torch.ones(1, 1, 8, 8, dtype=torch.uint8) * 2  # top-2
    seen = _spy_on_logits(model)
    for rest, n_learned in ((False, 2), (True, 64)):
        obj = ResMixMatch(ResMixMatchConfig(mixup_alpha=0.0, rampup_steps=0, mask_ratio=0.0, jitter=0.0,
                                            guess_rest=rest))
        obj(model, x, y, (0, 0), 10, torch.Generator().manual_seed(1), bags=bags).backward()
        assert int((seen["logits"].grad.abs().sum(-1) > 0).sum()) == n_learned


def _thin_defects(n: int, seed: int) -> tuple[ResidualSet, torch.Tensor]:
    """Real defects thinner than a block, as Eq. 15 labels them from their masks: a short line of large residuals
    whose blocks the mask covers by less than eps_pos, so each is ignored (-1), and every other block normal."""
    g, fields, labels, truth = _quiet_fields(n, seed)
    for i in range(n):
        r, c = (int(v) for v in torch.randint(1, 12, (2,), generator=g))
        fields[i, r, c : c + 3] += 2.0
        truth[i, r, c : c + 3] = True
        labels[i, r, c : c + 3] = -1
    return ResidualSet(fields.half(), labels, ["defect"] * n), truth


def test_masks_learned_with_resmixmatch_teach_the_thin_defects_the_focal_loss_ignores():
    """swin.finetune_objective: with the focal loss a defect whose blocks all lie between eps_neg and eps_pos
    teaches nothing (only the surrounding normal blocks are learned); with ResMixMatch those blocks are guessed and
    each connected group holds at least one defect block, so the fine-tuned Swin finds such defects."""
    from training_host.config import ProductConfig
    from training_host.evaluation.metrics import roc_auc
    from training_host.training.fit import _train_member

    real, _ = _thin_defects(24, 0)
    assert torch.equal(real.ignored_as_unknown().labels == UNKNOWN, real.labels == -1)
    assert torch.equal(real.ignored_as_unknown().labels[real.labels != -1], real.labels[real.labels != -1])
    g = torch.Generator().manual_seed(5)
    good = ResidualSet((torch.rand(16, 16, 16, 12, generator=g) * 0.5).half(),
                       torch.zeros(16, 16, 16, dtype=torch.int8), ["good"] * 16)
    test, truth = _thin_defects(16, 1)
    found = {}
    for objective in ("focal", "resmixmatch"):
        cfg = ProductConfig.model_validate({
            "swin": {"batch_size": 8, "warmup_steps": 5, "ema": 0.9, "checkpoint_every": 1000, "steps": 20,
                     "lr": 3e-3, "finetune_steps": 80, "finetune_lr": 1e-3, "defect_fraction": 0.5,
                     "finetune_objective": objective},
            "weak": {"rampup_steps": 20}})
        torch.manual_seed(0)
        model = ResidualSwin(SwinShape(in_dim=12, embed_dim=16, depth=2, heads=2, train_window=16))
        model.set_input_scale(good.fields.float())
        trainer = SwinTrainer(model, cfg.swin, seed=0)
        phases, steps = _train_member(cfg, None, trainer, good, real, None, False)
        assert [p["phase"] for p in phases] == ["unsupervised", "supervised"] and steps == 100
        with torch.no_grad():
            prob = trainer.ema(test.fields.float())
        found[objective] = (roc_auc(truth.flatten().numpy(), prob.flatten().numpy()), float(prob[truth].mean()),
                            float(prob[~truth].mean()))
    (_, focal_defect, focal_normal), (auroc, defect, normal) = found["focal"], found["resmixmatch"]
    assert focal_defect < 1.5 * focal_normal, found  # the focal loss never saw them: as likely as normal blocks
    assert auroc > 0.95 and defect > 3 * normal and defect > focal_defect + 0.2, found
