"""Report numbers against independent NumPy / SciPy references on small fixed cases."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

import lggunet
from lggunet import inference, postprocessing, report, steps, volume_metrics
from lggunet.configs import demo
from lggunet.errors import ConfigError, InputError


def surface_points(mask):
    """Voxels of the mask with at least one 6-neighbour (or the border) outside: by loops."""
    padded = np.pad(mask, 1)
    points = []
    for idx in zip(*np.nonzero(mask), strict=True):
        p = tuple(i + 1 for i in idx)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if not padded[tuple(q)]:
                    points.append(idx)
                    break
            else:
                continue
            break
    return np.array(points, float)


def brute_hd95(a, b):
    pa, pb = surface_points(a), surface_points(b)
    d = cdist(pa, pb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_hand_cases():
    a = np.zeros((1, 20, 20), bool)
    b = a.copy()
    a[0, 3, 3] = True
    b[0, 3, 8] = True
    assert volume_metrics.hd95(a, b) == pytest.approx(5.0)
    assert np.isnan(volume_metrics.hd95(a, np.zeros_like(a)))
    assert volume_metrics.hd95(a, a) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_on_random_volumes(seed):
    rng = np.random.default_rng(seed)
    true = np.zeros((4, 24, 24), bool)
    pred = np.zeros((4, 24, 24), bool)
    true[1:3, 5:15, 6:14] = True
    pred[0:3, 7 + seed : 16 + seed, 4:12] = True
    pred |= rng.random(pred.shape) > 0.985  # a few stray voxels
    assert volume_metrics.hd95(true, pred) == pytest.approx(brute_hd95(true, pred), abs=1e-9)


def test_masks_of_different_shapes_are_refused_not_broadcast():
    one_slice = np.ones((1, 8, 8), bool)
    volume = np.zeros((4, 8, 8), bool)
    volume[1, 2:5, 2:5] = True
    for metric in (volume_metrics.dice, volume_metrics.precision_recall, volume_metrics.hd95):
        with pytest.raises(ValueError, match=r"\(4, 8, 8\) and \(1, 8, 8\)"):
            metric(volume, one_slice)


@pytest.mark.parametrize("where", ["middle", "edges", "apart"])
def test_hd95_of_small_masks_in_a_large_volume_matches_brute_force(where):
    """hd95 works on the box around both masks: masks at the volume's faces (their surface
    there included) and far apart give the whole volume's answer, with and without spacing."""
    true = np.zeros((6, 96, 80), bool)
    pred = np.zeros_like(true)
    if where == "middle":
        true[2:4, 40:50, 30:37] = True
        pred[1:4, 42:53, 28:35] = True
    elif where == "edges":
        true[0:3, 0:9, 70:80] = True  # touches three faces
        pred[0:2, 0:6, 74:80] = True
        pred[5, 95, 0] = True  # a stray voxel in the opposite corner
    else:
        true[1:3, 3:8, 3:9] = True
        pred[3:5, 80:90, 60:75] = True
    expected = brute_hd95(true, pred)
    assert volume_metrics.hd95(true, pred) == pytest.approx(expected, abs=1e-9)
    spacing = (3.0, 0.5, 0.7)
    st, sp = volume_metrics._surface(true), volume_metrics._surface(pred)
    whole = max(  # the uncropped computation, by SciPy on the whole grid
        np.percentile(ndimage.distance_transform_edt(~st, sampling=spacing)[sp], 95),
        np.percentile(ndimage.distance_transform_edt(~sp, sampling=spacing)[st], 95),
    )
    assert volume_metrics.hd95(true, pred, spacing) == pytest.approx(whole, abs=1e-9)


def test_dice_precision_recall_and_detection_hand_case():
    t = np.zeros((2, 4, 4), bool)
    p = np.zeros((2, 4, 4), bool)
    t[0, :2, :2] = True  # 4 pixels
    p[0, :2, :1] = True  # 2 pixels, both inside
    p[1, 0, 0] = True  # 1 false positive
    assert volume_metrics.dice(t, p) == pytest.approx(2 * 2 / (4 + 3))
    assert volume_metrics.precision_recall(t, p) == pytest.approx((2 / 3, 2 / 4))
    assert volume_metrics.dice(np.zeros(3), np.zeros(3)) == 1.0
    det = volume_metrics.detection([5, 0, 0, 7, 0], [5, 3, 0, 0, 12], min_pixels=4)
    # truth +,-,-,+,-; called +,-,-,-,+ -> tp 1, fn 1, tn 2, fp 1
    assert (det["tp"], det["fn"], det["tn"], det["fp"]) == (1, 1, 2, 1)
    assert det["sensitivity"] == 0.5 and det["specificity"] == pytest.approx(2 / 3)


def test_largest_component_keeps_the_biggest_3d_blob():
    m = np.zeros((3, 10, 10), np.uint8)
    m[0:2, 1:3, 1:3] = 1  # 8 voxels, across two slices
    m[2, 6:8, 6:9] = 1  # 6 voxels
    kept = postprocessing.largest_component(m)
    np.testing.assert_array_equal(kept, (np.arange(3)[:, None, None] < 2) & (m > 0))
    diagonal = np.zeros((2, 4, 4), np.uint8)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = 1  # 26-connected: one component
    assert postprocessing.largest_component(diagonal).sum() == 2


def test_small_components_are_dropped_and_the_rest_kept():
    m = np.zeros((3, 10, 10), np.uint8)
    m[0:2, 1:3, 1:3] = 1  # 8 voxels, across two slices
    m[2, 6:8, 6:9] = 1  # 6 voxels
    m[0, 9, 0] = m[1, 8, 1] = 1  # 2 voxels, touching only diagonally: one 26-component
    big = np.zeros_like(m)
    big[0:2, 1:3, 1:3] = 1
    np.testing.assert_array_equal(postprocessing.drop_small_components(m, 7), big)
    without_pair = m.copy()
    without_pair[0, 9, 0] = without_pair[1, 8, 1] = 0
    np.testing.assert_array_equal(postprocessing.drop_small_components(m, 6), without_pair)
    np.testing.assert_array_equal(postprocessing.drop_small_components(m, 3), without_pair)
    np.testing.assert_array_equal(postprocessing.drop_small_components(m, 2), m)
    np.testing.assert_array_equal(postprocessing.drop_small_components(m, 0), m)
    assert postprocessing.drop_small_components(m, 9).sum() == 0
    # Dropping first, then the largest: the recipe's order.
    np.testing.assert_array_equal(postprocessing.postprocess(m, largest=True, min_voxels=3), big)
    for bad in (-1, 2.5, True, "500"):
        with pytest.raises(InputError, match="min_component_voxels="):
            postprocessing.check_min_voxels(bad)


class RecipeModel:
    """A stand-in for `inference.Model`: fixed probabilities and a recipe's `predict.*`."""

    def __init__(self, probs: np.ndarray, **predict):
        self.probs = probs
        self.config = ml_collections.ConfigDict({"predict": predict})

    def __call__(self, images, volume_mean=None, volume_std=None, brain_stats=None, scale=None):
        return self.probs if np.ndim(images) == 4 else self.probs[0]


def test_predict_follows_the_models_recipe_unless_told_otherwise():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[0:2, 1:3, 1:3] = 0.9  # 8 voxels
    probs[2, 6:8, 6:9] = 0.45  # 6 voxels, tumour only at a threshold under 0.45
    probs[0, 8:10, 8:10] = 0.7  # 4 voxels on the first slice
    images = np.zeros((3, 10, 10, 3), np.uint8)
    model = RecipeModel(probs, threshold=0.4, largest_component=False, min_component_voxels=5)
    expected = (probs > 0.4).astype(np.uint8)
    expected[0, 8:10, 8:10] = 0  # the 4-voxel component, under 5
    np.testing.assert_array_equal(lggunet.predict(images, model), expected)
    # Arguments given win over the recipe.
    np.testing.assert_array_equal(
        lggunet.predict(images, model, threshold=0.5, min_component_voxels=0),
        (probs > 0.5).astype(np.uint8),
    )
    largest = np.zeros_like(expected)
    largest[0:2, 1:3, 1:3] = 1
    np.testing.assert_array_equal(
        lggunet.predict(images, model, largest_connected_component=True), largest
    )
    # One slice: the recipe's threshold, but not its 3D component filters.
    np.testing.assert_array_equal(
        lggunet.predict(images[0], model), (probs[0] > 0.4).astype(np.uint8)
    )
    # A model without a recipe: p > 0.5, nothing filtered.
    model.config = None
    np.testing.assert_array_equal(lggunet.predict(images, model), (probs > 0.5).astype(np.uint8))


def test_a_recipe_or_argument_that_cannot_work_is_refused_not_coerced():
    probs = np.full((2, 4, 4), 0.7, np.float32)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    for bad in ({"threshold": None}, {"threshold": "0.3"}, {"threshold": 1.5},
                {"min_component_voxels": -5}, {"min_component_voxels": 2.5},
                {"largest_component": "false"}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"the model's recipe \(its config's predict"):
            lggunet.predict(images, RecipeModel(probs, **bad))
    model = RecipeModel(probs)
    for bad in ("False", "no", 1):
        with pytest.raises(InputError, match="largest_connected_component=.* True or False"):
            lggunet.predict(images, model, largest_connected_component=bad)
    np.testing.assert_array_equal(
        lggunet.predict(images, model, largest_connected_component=np.bool_(False)),
        np.ones((2, 4, 4), np.uint8),
    )


def test_checkpoint_names_and_numpy_step_numbers_are_accepted():
    assert inference.check_checkpoint(None) is None
    assert inference.check_checkpoint("last") == "last"
    step = inference.check_checkpoint(np.int64(1386))  # e.g. read from a record with NumPy
    assert step == 1386 and type(step) is int
    for bad in ("latest", -1, True, 2.0):
        with pytest.raises(ConfigError, match="use 'best'"):
            inference.check_checkpoint(bad)


def fixed_model(probs: np.ndarray) -> steps.Weights:
    """A 'network' whose output is `probs` (N, H, W), whatever it is shown."""
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    logits = jnp.asarray(np.log(p) - np.log1p(-p))[..., None]
    return steps.Weights(params={}, batch_stats={}, apply_fn=lambda v, x, train: logits)


def as_source(truth: np.ndarray, patients: list[str]) -> list[dict]:
    return [
        {
            "image": np.zeros((*t.shape, 3), np.uint8),
            "mask": t[..., None].astype(np.uint8),
            "patient_id": pid.encode(),
            "slice_index": i,
            "tumour_area": int(t.sum()),
            "volume_mean": np.zeros(3, np.float32),
            "volume_std": np.ones(3, np.float32),
            "brain_stats": np.ones((6, 3), np.float32),
        }
        for i, (t, pid) in enumerate(zip(truth, patients, strict=True))
    ]


def test_report_scores_equal_numpy_reference():
    """The evaluator and report scoring on two hand-made patients: notebook formulas,
    per-volume Dice, HD95, detection, against NumPy."""
    rng = np.random.default_rng(0)
    n = 6
    truth = np.zeros((n, 16, 16), bool)
    truth[1, 4:9, 4:9] = truth[2, 5:10, 4:8] = truth[4, 2:6, 2:6] = True
    probs = np.clip(truth * 0.8 + rng.random((n, 16, 16)) * 0.3, 0, 1).astype(np.float32)
    probs[5, 10:13, 10:13] = 0.9  # a false positive blob, in patient B's last slice
    patients = ["A", "A", "A", "B", "B", "B"]
    config = demo.get_config()
    config.data.image_size, config.eval_batch_size = 16, n  # no resizing; one batch
    config.evaluate.largest_component = True
    config.evaluate.detection_min_pixels = 4
    scores = report.score_source(fixed_model(probs), as_source(truth, patients), config, False)
    result, rows, _ = report.score_split(scores, config)

    t, p = truth.astype(np.float64), probs.astype(np.float64)
    nb_dice = (2 * (t * p).sum() + 100) / (t.sum() + p.sum() + 100)
    nb_iou = ((t * p).sum() + 100) / ((t + p).sum() - (t * p).sum() + 100)
    assert result["notebook"]["plain"]["dice"] == pytest.approx(nb_dice, rel=1e-5)
    assert result["notebook"]["plain"]["iou"] == pytest.approx(nb_iou, rel=1e-5)
    assert result["notebook"]["plain"]["accuracy"] == pytest.approx(
        ((p > 0.5) == t).mean(), rel=1e-6
    )
    binary = probs > 0.5
    for row, idx in zip(rows, (slice(0, 3), slice(3, 6)), strict=True):
        tv, pv = truth[idx], binary[idx]
        ref = 2 * (tv & pv).sum() / (tv.sum() + pv.sum())
        assert row["dice"] == pytest.approx(ref)
        assert row["true_area"] == tv.sum() and row["pred_area"] == pv.sum()
        assert row["hd95"] == pytest.approx(brute_hd95(tv, pv))
    plain = result["variants"]["plain"]
    assert plain["volume_dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    areas = binary.sum(axis=(1, 2))
    det = plain["detection"]
    assert det["tp"] == int(((truth.sum(axis=(1, 2)) > 0) & (areas >= 4)).sum())
    assert det["fp"] == int(((truth.sum(axis=(1, 2)) == 0) & (areas >= 4)).sum())
    # LCC removes patient B's separate false-positive blob (and the noise specks).
    lcc_b = postprocessing.largest_component(binary[3:6])
    assert rows[1]["pred_area_lcc"] == lcc_b.sum() < rows[1]["pred_area"]
