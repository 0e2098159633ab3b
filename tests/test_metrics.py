"""Metrics against NumPy formulas of the notebook and hand-computed cases."""

import numpy as np
import pytest

from lggunet import losses, metrics


def np_dice(t, p, s=100.0):
    t, p = t.ravel().astype(np.float64), p.ravel().astype(np.float64)
    return (2 * np.sum(t * p) + s) / (np.sum(t) + np.sum(p) + s)


def np_iou(t, p, s=100.0):
    t, p = t.ravel().astype(np.float64), p.ravel().astype(np.float64)
    inter = np.sum(t * p)
    return (inter + s) / (np.sum(t + p) - inter + s)


@pytest.fixture
def soft_batch():
    rng = np.random.default_rng(0)
    t = (rng.random((4, 16, 16, 1)) > 0.7).astype(np.float32)
    p = rng.random((4, 16, 16, 1)).astype(np.float32)
    return t, p


def test_notebook_formulas_match_numpy(soft_batch):
    t, p = soft_batch
    np.testing.assert_allclose(metrics.dice_coef(t, p), np_dice(t, p), rtol=1e-5)
    np.testing.assert_allclose(metrics.iou_coef(t, p), np_iou(t, p), rtol=1e-5)
    np.testing.assert_allclose(losses.dice_loss(np.log(p / (1 - p)), t), -np_dice(t, p), rtol=1e-4)
    acc = np.mean((p > 0.5) == (t > 0.5))
    np.testing.assert_allclose(metrics.pixel_accuracy(t, p), acc, rtol=1e-6)


def test_weights_drop_padding_examples(soft_batch):
    t, p = soft_batch
    w = np.array([1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(metrics.dice_coef(t, p, w), np_dice(t[:2], p[:2]), rtol=1e-5)
    np.testing.assert_allclose(metrics.iou_coef(t, p, w), np_iou(t[:2], p[:2]), rtol=1e-5)
    acc = np.mean((p[:2] > 0.5) == (t[:2] > 0.5))
    np.testing.assert_allclose(metrics.pixel_accuracy(t, p, w), acc, rtol=1e-6)


def test_hand_cases():
    empty = np.zeros((1, 10, 10, 1), np.float32)
    full = np.ones((1, 10, 10, 1), np.float32)
    # All empty: (0 + 100) / (0 + 0 + 100) = 1.
    assert float(metrics.dice_coef(empty, empty)) == pytest.approx(1.0)
    assert float(metrics.iou_coef(empty, empty)) == pytest.approx(1.0)
    # Perfect on 100 pixels: (200 + 100) / (100 + 100 + 100) = 1; IoU (100+100)/(200-100+100).
    assert float(metrics.dice_coef(full, full)) == pytest.approx(1.0)
    assert float(metrics.iou_coef(full, full)) == pytest.approx(1.0)
    # Disjoint halves, 50 pixels each: dice (0 + 100) / (50 + 50 + 100) = 0.5,
    # iou (0 + 100) / (100 - 0 + 100) = 0.5.
    left = np.zeros((1, 10, 10, 1), np.float32)
    left[:, :, :5] = 1
    right = 1 - left
    assert float(metrics.dice_coef(left, right)) == pytest.approx(0.5)
    assert float(metrics.iou_coef(left, right)) == pytest.approx(0.5)
    # Half overlap: truth 50 px, prediction all 100 px: dice (100 + 100) / (50 + 100 + 100) = 0.8,
    # iou (50 + 100) / (150 - 50 + 100) = 0.75.
    assert float(metrics.dice_coef(left, full)) == pytest.approx(0.8)
    assert float(metrics.iou_coef(left, full)) == pytest.approx(0.75)
    assert float(metrics.pixel_accuracy(left, full)) == pytest.approx(0.5)


def test_per_slice_and_per_volume_dice():
    # Three slices: perfect (10 px), empty/empty, disjoint (4 px truth, 6 px predicted).
    t = np.zeros((3, 8, 8, 1), np.float32)
    p = np.zeros((3, 8, 8, 1), np.float32)
    t[0, :2, :5] = 1
    p[0, :2, :5] = 0.9
    t[2, 0, :4] = 1
    p[2, 5, :6] = 0.8
    stats = {k: np.asarray(v) for k, v in metrics.slice_stats(t, p).items()}
    np.testing.assert_array_equal(stats["intersection"], [10, 0, 0])
    np.testing.assert_array_equal(stats["true_area"], [10, 0, 4])
    np.testing.assert_array_equal(stats["pred_area"], [10, 0, 6])
    np.testing.assert_allclose(metrics.per_slice_dice(**stats), [1.0, 1.0, 0.0])
    # Patient a = slices 0 and 2: 2*10 / (14 + 16); patient b = the empty slice: 1.0.
    vol = metrics.per_volume_dice(["a", "b", "a"], **stats)
    assert vol == {"a": pytest.approx(20 / 30), "b": 1.0}


def test_bce_dice_loss_matches_numpy(soft_batch):
    t, p = soft_batch
    logits = np.log(p / (1 - p))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    np.testing.assert_allclose(losses.bce_dice_loss(logits, t), bce - np_dice(t, p), rtol=1e-4)


def test_topk_bce_dice_loss_matches_numpy(soft_batch):
    t, p = soft_batch
    logits = np.log(p / (1 - p))
    per_pixel = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    for w, kept in ((None, [0, 1, 2, 3]), (np.array([1, 0, 1, 1], np.float32), [0, 2, 3])):
        values = np.sort(per_pixel[kept].ravel())[::-1]
        k = round(0.1 * values.size)
        expected = values[:k].mean() - np_dice(t[kept], p[kept])
        got = losses.get_loss("topk_bce_dice")(logits, t, w)
        np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Hand case: 10 pixels, one confidently missed (p = e^-5 where t = 1): the hardest 10% is
    # that pixel alone, so its cross-entropy counts in full (5), where plain BCE averages it
    # with 9 easy ones.
    truth = np.zeros((1, 1, 10, 1), np.float32)
    truth[0, 0, 0] = 1
    logits = np.full((1, 1, 10, 1), -20.0, np.float32)
    logits[0, 0, 0] = np.log(np.exp(-5) / (1 - np.exp(-5)))
    bce_part = losses.topk_bce_dice_loss(logits, truth) - losses.dice_loss(logits, truth)
    np.testing.assert_allclose(bce_part, 5.0, rtol=1e-4)
    # A batch of padding only (weights 0) adds no cross-entropy, as bce_dice.
    nothing = np.zeros(1, np.float32)
    bce_part = losses.topk_bce_dice_loss(logits, truth, nothing) - losses.dice_loss(
        logits, truth, nothing
    )
    assert float(bce_part) == 0.0


def np_tversky(t, p, beta, s=100.0):
    t, p = t.ravel().astype(np.float64), p.ravel().astype(np.float64)
    tp = np.sum(t * p)
    fp, fn = np.sum((1 - t) * p), np.sum(t * (1 - p))
    return (2 * tp + s) / (2 * tp + 2 * (1 - beta) * fp + 2 * beta * fn + s)


def test_tversky_index_matches_numpy_and_is_the_notebook_dice_at_one_half(soft_batch):
    t, p = soft_batch
    w = np.array([1, 0, 1, 1], np.float32)
    kept = np.array([0, 2, 3])
    for beta in (0.3, 0.5, 0.7, 0.9):
        expected = np_tversky(t[kept], p[kept], beta)
        np.testing.assert_allclose(losses.tversky_index(t, p, w, beta=beta), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.tversky_index(t, p), np_dice(t, p), rtol=1e-5)
    logits = np.log(p / (1 - p))
    # At 0.5 the loss is the notebook's formula itself, to the bit, not an algebraic equal.
    notebook = -metrics.dice_coef(t, 1 / (1 + np.exp(-logits)))
    assert float(losses.get_loss("dice", 0.5)(logits, t)) == pytest.approx(float(notebook), 1e-6)
    assert float(losses.get_loss("dice", 0.5)(logits, t)) == float(
        -metrics.dice_coef(t, losses.jax.nn.sigmoid(logits))
    )
    np.testing.assert_allclose(
        losses.get_loss("dice", 0.7)(logits, t, w), -np_tversky(t[kept], p[kept], 0.7), rtol=1e-4
    )
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
    np.testing.assert_allclose(
        losses.get_loss("bce_dice", 0.7)(logits, t), bce - np_tversky(t, p, 0.7), rtol=1e-4
    )


def test_tversky_beta_above_one_half_costs_a_miss_more_than_a_false_alarm():
    # 4 tumour pixels. Missing 2 of them: TP 2, FN 2, FP 0; two false alarms: TP 4, FP 2.
    # By hand, smooth 0 and beta 0.7: 4 / (4 + 1.4 * 2) = 0.5882 and 8 / (8 + 0.6 * 2) = 0.8696;
    # Dice (beta 0.5): 4 / 6 = 0.6667 and 8 / 10 = 0.8.
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32).reshape(1, 2, 4, 1)
    missed = np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32).reshape(1, 2, 4, 1)
    alarms = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32).reshape(1, 2, 4, 1)
    index = losses.tversky_index
    assert float(index(truth, missed, beta=0.7, smooth=0.0)) == pytest.approx(4 / 6.8)
    assert float(index(truth, alarms, beta=0.7, smooth=0.0)) == pytest.approx(8 / 9.2)
    assert float(index(truth, missed, smooth=0.0)) == pytest.approx(4 / 6)
    assert float(index(truth, alarms, smooth=0.0)) == pytest.approx(8 / 10)


def test_downsampled_masks_hand_case():
    """Each 2x2 block's mean, then >= 0.5 (a tie of 2 of 4 pixels is tumour); soft keeps it."""
    m = np.zeros((1, 4, 4, 1), np.float32)
    m[0, 0, 0] = 1  # 1 of the top-left block's 4: 0.25
    m[0, 0:2, 2] = 1  # 2 of the top-right block's 4: 0.5
    m[0, 2:4, 0:2] = 1  # the whole bottom-left block: 1.0
    m[0, 2:4, 2] = m[0, 2, 3] = 1  # 3 of the bottom-right block's 4: 0.75
    np.testing.assert_array_equal(
        losses.downsampled_masks(m, 2)[0, ..., 0], [[0.0, 1.0], [1.0, 1.0]]
    )
    np.testing.assert_allclose(
        losses.downsampled_masks(m, 2, soft=True)[0, ..., 0], [[0.25, 0.5], [1.0, 0.75]]
    )
    np.testing.assert_array_equal(losses.downsampled_masks(m, 4)[0, ..., 0], [[1.0]])  # 10/16


def test_deep_supervision_loss_matches_numpy():
    """Levels 0, 1, 2 weighted 1, 1/2, 1/4 (normalised by 1.75), each the BCE + Dice of its
    logits against the masks' block-majority downsampling with smooth 100 / 4**level,
    computed here with NumPy loops; a padding example (weight 0) counts at no level."""
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 8, 8, 1)) > 0.6).astype(np.float32)
    logits = {i: rng.normal(size=(3, 8 // 2**i, 8 // 2**i, 1)).astype(np.float32) for i in range(3)}
    valid = np.array([1.0, 1.0, 0.0], np.float32)

    def np_level(i):
        f = 2**i
        t = np.zeros((2, 8 // f, 8 // f, 1), np.float32)
        for b in range(2):  # the valid examples
            for r in range(8 // f):
                for c in range(8 // f):
                    t[b, r, c, 0] = masks[b, r * f : (r + 1) * f, c * f : (c + 1) * f].mean() >= 0.5
        p = 1 / (1 + np.exp(-logits[i][:2].astype(np.float64)))
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()
        return bce - np_dice(t, p, s=100.0 / 4**i)  # smooth in pixels of the level

    expected = (np_level(0) + np_level(1) / 2 + np_level(2) / 4) / 1.75
    got = losses.deep_supervision_loss(
        losses.bce_dice_loss, logits[0], {1: logits[1], 2: logits[2]}, masks, valid
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    alone = losses.deep_supervision_loss(losses.bce_dice_loss, logits[0], {}, masks, valid)
    np.testing.assert_allclose(alone, losses.bce_dice_loss(logits[0], masks, valid), rtol=1e-6)
