"""Augmentation: Keras ImageDataGenerator semantics, checked against scipy and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from lggunet import augment
from lggunet.augment import AugmentParams


def keras_matrix(theta, tx, ty, shear, zx, zy, h, w):
    """Keras-preprocessing's apply_affine_transform matrix, written out in NumPy."""
    theta, shear = np.deg2rad(theta), np.deg2rad(shear)
    rot = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    sh = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    m = rot @ shift @ sh @ zoom
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    offset = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]])
    reset = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    return offset @ m @ reset


def keras_apply(image, m):
    """What Keras does per channel: scipy affine_transform, order 1, mode 'nearest'."""
    return np.stack(
        [
            ndimage.affine_transform(image[..., c], m[:2, :2], m[:2, 2], order=1, mode="nearest")
            for c in range(image.shape[-1])
        ],
        axis=-1,
    )


def test_warp_matches_scipy_affine_transform():
    rng = np.random.default_rng(0)
    image = rng.random((32, 40, 3)).astype(np.float32)
    t = {"theta": 12.0, "tx": 0.1, "ty": -0.05, "shear": 8.0, "zx": 1.1, "zy": 0.9}
    ours = augment.transform_matrix({k: jnp.float32(v) for k, v in t.items()}, 32, 40)
    ref = keras_matrix(12.0, 0.1 * 32, -0.05 * 40, 8.0, 1.1, 0.9, 32, 40)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(
        augment.warp(jnp.asarray(image), ours), keras_apply(image, ref), atol=2e-5
    )


def test_soft_masks_are_warped_like_the_image_and_not_thresholded():
    mask = np.zeros((3, 24, 24, 1), np.float32)
    mask[:, 6:18, 8:14] = 1.0
    params = AugmentParams(rotation_range=30.0)  # rotation only: no flip, no shift
    key = jax.random.key(4)
    _, soft = augment.augment_batch(key, jnp.asarray(mask), jnp.asarray(mask), params, soft=True)
    _, binary = augment.augment_batch(key, jnp.asarray(mask), jnp.asarray(mask), params)
    for i, k in enumerate(jax.random.split(key, 3)):
        theta = float(augment.random_transform(k, params)["theta"])
        ref = keras_apply(mask[i], keras_matrix(theta, 0, 0, 0, 1, 1, 24, 24))
        np.testing.assert_allclose(soft[i], ref, atol=2e-5)  # scipy's bilinear warp
        np.testing.assert_array_equal(binary[i], (np.asarray(soft[i]) > 0.5).astype(np.float32))
    assert np.any((np.asarray(soft) > 0.05) & (np.asarray(soft) < 0.95))  # soft edges kept


def test_zero_ranges_are_identity_bit_for_bit():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.random((3, 16, 16, 3)).astype(np.float32))
    masks = jnp.asarray((rng.random((3, 16, 16, 1)) > 0.5).astype(np.float32))
    out_i, out_m = augment.augment_batch(jax.random.key(0), images, masks, AugmentParams())
    np.testing.assert_array_equal(out_i, images)
    np.testing.assert_array_equal(out_m, masks)


def test_horizontal_flip_mirrors_exactly():
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.random((16, 8, 8, 3)).astype(np.float32))
    masks = jnp.asarray((rng.random((16, 8, 8, 1)) > 0.5).astype(np.float32))
    out_i, out_m = augment.augment_batch(
        jax.random.key(3), images, masks, AugmentParams(horizontal_flip=True)
    )
    flipped = [bool(np.array_equal(out_i[i], images[i, :, ::-1])) for i in range(16)]
    same = [bool(np.array_equal(out_i[i], images[i])) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 0 < sum(flipped) < 16  # p = 0.5: some of each in 16 draws
    for i in range(16):
        ref = masks[i, :, ::-1] if flipped[i] else masks[i]
        np.testing.assert_array_equal(out_m[i], ref)


@pytest.mark.parametrize("k", [3, -2])
def test_pure_shift_moves_a_square_with_nearest_fill(k):
    image = np.zeros((20, 20, 1), np.float32)
    image[8:12, 8:12] = 1.0
    image[:, 0] = 0.5  # a left edge column, to see the nearest fill
    t = {"theta": 0.0, "tx": 0.0, "ty": -k / 20, "shear": 0.0, "zx": 1.0, "zy": 1.0}
    m = augment.transform_matrix({a: jnp.float32(b) for a, b in t.items()}, 20, 20)
    out = np.asarray(augment.warp(jnp.asarray(image), m))
    expected = np.zeros_like(image)
    expected[8:12, 8 + k : 12 + k] = 1.0
    expected[:, k if k > 0 else 0] = 0.5  # the edge column moved ...
    if k > 0:
        expected[:, :k] = 0.5  # ... and the columns shifted in repeat it (nearest fill)
    else:
        expected[:, 0] = 0.0
        expected[:, k:] = 0.0  # the right edge was 0 and is repeated
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_image_and_mask_share_the_transform_and_masks_stay_binary():
    image = np.zeros((1, 32, 32, 3), np.float32)
    mask = np.zeros((1, 32, 32, 1), np.float32)
    image[0, 10:20, 12:18] = 1.0
    mask[0, 10:20, 12:18] = 1.0
    params = AugmentParams(30.0, 0.1, 0.1, 10.0, 0.1, True)
    for seed in range(10):
        out_i, out_m = augment.augment_batch(
            jax.random.key(seed), jnp.asarray(image), jnp.asarray(mask), params
        )
        assert set(np.unique(out_m).tolist()) <= {0.0, 1.0}
        # The mask is the image's square thresholded the same way.
        np.testing.assert_array_equal(out_m[..., 0], (out_i[..., 0] > 0.5).astype(np.float32))


def test_same_key_same_output_different_keys_differ():
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.random((4, 16, 16, 3)).astype(np.float32))
    masks = jnp.zeros((4, 16, 16, 1))
    params = augment.PRESETS["buda2019"]
    a = augment.augment_batch(jax.random.key(5), images, masks, params)[0]
    b = augment.augment_batch(jax.random.key(5), images, masks, params)[0]
    c = augment.augment_batch(jax.random.key(6), images, masks, params)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_drawn_angles_and_zooms_stay_in_range():
    params = AugmentParams(rotation_range=15.0, zoom_range=0.05, shear_range=5.0)
    keys = jax.random.split(jax.random.key(7), 2000)
    t = jax.vmap(lambda k: augment.random_transform(k, params))(keys)
    theta, zx, zy = (np.asarray(t[k]) for k in ("theta", "zx", "zy"))
    assert theta.min() >= -15 and theta.max() <= 15 and theta.max() - theta.min() > 28
    for z in (zx, zy):
        assert z.min() >= 0.95 and z.max() <= 1.05
    assert abs(np.corrcoef(zx, zy)[0, 1]) < 0.1  # drawn independently
    # The angle recovered from the matrix (no shear, no zoom) is the drawn one.
    rot_only = AugmentParams(rotation_range=15.0)
    for key in keys[:50]:
        tt = augment.random_transform(key, rot_only)
        m = np.asarray(augment.transform_matrix(tt, 16, 16))
        recovered = np.rad2deg(np.arctan2(m[1, 0], m[0, 0]))
        assert abs(recovered) <= 15 + 1e-4
        assert recovered == pytest.approx(float(tt["theta"]), abs=1e-4)


def test_masks_without_a_channel_come_back_as_given_and_bad_shapes_are_named():
    """(B, H, W) masks, as `lggunet.read_patient` gives them, get the same transform as
    (B, H, W, 1) ones and keep their shape; a mask that does not match is one clear error."""
    from lggunet.errors import InputError

    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.random((3, 16, 16, 3)).astype(np.float32))
    masks = (rng.random((3, 16, 16)) > 0.7).astype(np.uint8)
    params = augment.PRESETS["buda2019"]
    img3, m3 = augment.augment_batch(jax.random.key(1), images, jnp.asarray(masks), params)
    img4, m4 = augment.augment_batch(
        jax.random.key(1), images, jnp.asarray(masks)[..., None], params
    )
    assert m3.shape == (3, 16, 16) and m4.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(m3, m4[..., 0])
    np.testing.assert_array_equal(img3, img4)
    with pytest.raises(InputError, match=r"masks \(3, 8, 8\): expected \(B, H, W, C\) images"):
        augment.augment_batch(jax.random.key(1), images, jnp.zeros((3, 8, 8)), params)
