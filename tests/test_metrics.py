"""Tests for mdregnet.metrics: analytic Jacobians, folding, Dice, SDlogJ, inverse consistency."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from mdregnet import metrics  # noqa: E402

SHAPES = {2: (11, 9), 3: (9, 8, 7)}  # anisotropic: a swapped axis changes the numbers

# Non-symmetric, det != 1, det > 0.
AFFINE = {
    2: np.array([[1.2, 0.3], [-0.4, 0.9]]),
    3: np.array([[1.1, 0.2, -0.3], [0.05, 0.8, 0.4], [-0.2, 0.1, 1.3]]),
}


def grid(shape):
    """Voxel coordinates `(*shape, ndims)` float64; component c = index along axis c."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape],
                                indexing="ij"), axis=-1)


def affine_disp(a, shape):
    """u(p) = (A - I) p, so phi(p) = A p."""
    return grid(shape) @ (a - np.eye(len(shape))).T


def folding_field(shape):
    """u_0 = -2 (clip(x_0, 4, 8) - 4): central differences give det = -1 for x_0 in 5..7 and
    det = 0 at x_0 = 4 and 8 (counted as folded: <= 0), det = 1 elsewhere."""
    disp = np.zeros(shape + (len(shape),))
    disp[..., 0] = -2.0 * (np.clip(grid(shape)[..., 0], 4, 8) - 4)
    return disp


# --------------------------------------------------------------------------------- Jacobian

@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_identity_is_one(ndims):
    disp = np.zeros(SHAPES[ndims] + (ndims,), np.float32)
    det = metrics.jacobian_determinant(disp)
    assert det.shape == SHAPES[ndims] and np.all(det == 1.0)
    batched = metrics.jacobian_determinant(disp[None].repeat(2, axis=0))
    assert batched.shape == (2,) + SHAPES[ndims] and np.all(batched == 1.0)
    assert np.all(metrics.jacobian_determinant_tf(disp[None]).numpy() == 1.0)


@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_of_affine_map_is_det_a(ndims):
    a = AFFINE[ndims]
    disp = affine_disp(a, SHAPES[ndims])
    want = np.linalg.det(a)
    # Transposing A leaves det unchanged, but pairing component c with the wrong axis does not.
    assert abs(np.linalg.det(np.eye(ndims) + (a - np.eye(ndims))[::-1]) - want) > 0.1
    np.testing.assert_allclose(metrics.jacobian_determinant(disp), want, rtol=1e-12)
    tf_det = metrics.jacobian_determinant_tf(disp[None].astype(np.float32)).numpy()[0]
    np.testing.assert_allclose(tf_det, want, rtol=1e-5)  # float32 round-off


@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_faces_are_one_sided(ndims):
    # u_0 = 0.05 x_0^2: central inside gives 0.1 x exactly; faces: 0.05 (1 - 0) at x = 0 and
    # 0.05 ((L-1)^2 - (L-2)^2) at x = L-1 (numpy.gradient, edge_order=1); no /2 at the faces.
    shape = SHAPES[ndims]
    length = shape[0]
    disp = np.zeros(shape + (ndims,))
    disp[..., 0] = 0.05 * grid(shape)[..., 0] ** 2
    x = np.arange(length, dtype=np.float64)
    slope = 0.1 * x
    slope[0] = 0.05
    slope[-1] = 0.05 * ((length - 1) ** 2 - (length - 2) ** 2)
    want = np.broadcast_to((1 + slope).reshape((-1,) + (1,) * (ndims - 1)), shape)
    np.testing.assert_allclose(metrics.jacobian_determinant(disp), want, rtol=1e-12)
    tf_det = metrics.jacobian_determinant_tf(disp[None].astype(np.float32)).numpy()[0]
    np.testing.assert_allclose(tf_det, want, rtol=1e-6)


@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_tf_matches_numpy(ndims):
    rng = np.random.default_rng(ndims)
    disp = rng.normal(scale=0.3, size=(2,) + SHAPES[ndims] + (ndims,)).astype(np.float32)
    disp = ndimage.gaussian_filter(disp, (0,) + (1.0,) * ndims + (0,))
    got = metrics.jacobian_determinant_tf(tf.constant(disp)).numpy()
    assert got.dtype == np.float32
    # float32 arithmetic on O(1) values: differences of a few ulp.
    np.testing.assert_allclose(got, metrics.jacobian_determinant(disp), atol=1e-5)
    # Also with 2-voxel axes (interior empty) and inside a tf.function.
    small = disp[:, :2, :3]
    fn = tf.function(metrics.jacobian_determinant_tf)
    np.testing.assert_allclose(fn(tf.constant(small)).numpy(),
                               metrics.jacobian_determinant(small), atol=1e-5)


def test_jacobian_bad_shapes():
    with pytest.raises(ValueError):
        metrics.jacobian_determinant(np.zeros((8, 8, 8, 4)))  # 4 components
    with pytest.raises(ValueError):
        metrics.jacobian_determinant(np.zeros((2, 2, 8, 8, 8, 3)))  # rank 6
    with pytest.raises(ValueError):
        metrics.jacobian_determinant(np.zeros((1, 8, 2)))  # spatial axis of 1 voxel
    with pytest.raises(ValueError):
        metrics.jacobian_determinant_tf(np.zeros((8, 8, 8, 3), np.float32))  # unbatched


# --------------------------------------------------------------------------------- folding

@pytest.mark.parametrize("ndims", [2, 3])
def test_folding_counts(ndims):
    shape = (13,) + SHAPES[ndims][1:]
    disp = folding_field(shape)
    per_slab = int(np.prod(shape[1:]))
    det = metrics.jacobian_determinant(disp)
    assert np.all(det[5:8] == -1) and np.all(det[[4, 8]] == 0) and np.all(det[:4] == 1)

    result = metrics.folding(disp)
    assert result["count"] == 5 * per_slab  # x_0 in 4..8, det 0 included
    assert result["percent"] == pytest.approx(100.0 * 5 / 13)
    assert "count_in_mask" not in result

    mask = np.zeros(shape, bool)
    mask[:6, : shape[1] // 2] = True  # x_0 in 0..5 -> 2 folded slabs (4, 5), half of axis 1
    in_mask = int(mask[4:6].sum())
    result = metrics.folding(disp, mask=mask)
    assert result["count_in_mask"] == in_mask
    assert result["percent_in_mask"] == pytest.approx(100.0 * in_mask / mask.sum())

    batched = metrics.folding(np.stack([disp, np.zeros_like(disp)]), mask=mask)
    assert batched["count"] == 5 * per_slab
    assert batched["percent"] == pytest.approx(100.0 * 5 / 26)
    assert batched["count_in_mask"] == in_mask

    assert metrics.folding(affine_disp(AFFINE[ndims], shape))["count"] == 0
    with pytest.raises(ValueError):
        metrics.folding(disp, mask=np.ones((3, 3)))
    with pytest.raises(ValueError):
        metrics.folding(disp, mask=np.zeros(shape))


# ----------------------------------------------------------------------------------- SDlogJ

@pytest.mark.parametrize("ndims", [2, 3])
def test_sd_log_jacobian(ndims):
    shape = SHAPES[ndims]
    assert metrics.sd_log_jacobian(np.zeros(shape + (ndims,))) == 0.0
    assert metrics.sd_log_jacobian(affine_disp(AFFINE[ndims], shape)) == pytest.approx(0, abs=1e-12)

    # Two known determinant values: u_0 = 0.5 x_0 for x_0 < 4, constant after -> slopes by
    # central differences: 0.5 (x < 4), 0.25 (x = 4), 0 (x > 4).
    disp = np.zeros(shape + (ndims,))
    disp[..., 0] = 0.5 * np.minimum(grid(shape)[..., 0], 4)
    log_det = np.log(metrics.jacobian_determinant(disp))
    assert sorted(np.unique(np.round(np.exp(log_det), 12))) == [1.0, 1.25, 1.5]
    assert metrics.sd_log_jacobian(disp) == pytest.approx(np.std(log_det), rel=1e-12)
    # Learn2Reg-style shift by 3 compresses the spread.
    shifted = np.std(np.log(np.exp(log_det) + 3))
    assert metrics.sd_log_jacobian(disp, shift=3.0) == pytest.approx(shifted, rel=1e-12)

    mask = np.zeros(shape, bool)
    mask[:3] = True  # only det = 1.5 there
    assert metrics.sd_log_jacobian(disp, mask=mask) == pytest.approx(0, abs=1e-12)

    # Folded voxels are clipped to 1e-9 (log = -20.7), not NaN.
    fold = folding_field((13,) + shape[1:])
    det = metrics.jacobian_determinant(fold)
    want = np.std(np.log(np.clip(det, 1e-9, 1e9)))
    got = metrics.sd_log_jacobian(fold)
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-12) and got > 5


# ---------------------------------------------------------------------- inverse consistency

@pytest.mark.parametrize("ndims", [2, 3])
def test_inverse_consistency_translation(ndims):
    shape = SHAPES[ndims]
    t = np.array([1.5, -0.5, 0.25][:ndims])
    fwd = np.broadcast_to(t, shape + (ndims,))
    result = metrics.inverse_consistency(fwd, -fwd)
    assert result["mean"] == pytest.approx(0, abs=1e-12)
    assert result["max"] == pytest.approx(0, abs=1e-12)
    wrong = metrics.inverse_consistency(fwd, fwd)
    assert wrong["mean"] == pytest.approx(2 * np.linalg.norm(t))
    assert wrong["max"] == pytest.approx(2 * np.linalg.norm(t))


@pytest.mark.parametrize("ndims", [2, 3])
def test_inverse_consistency_linear_inverse_field(ndims):
    # u = t (constant), u_inv(p) = L p + b (linear, so bi/trilinear sampling is exact inside):
    # residual r(p) = t + L (p + t) + b. A swapped sampling axis or a sign error changes r.
    shape = SHAPES[ndims]
    t = np.array([1.5, -0.5, 0.25][:ndims])
    lin = 0.1 * (AFFINE[ndims] - np.eye(ndims)) + 0.05 * np.eye(ndims)[::-1]
    b = np.array([-1.0, 0.3, 0.2][:ndims])
    fwd = np.broadcast_to(t, shape + (ndims,))
    inv = grid(shape) @ lin.T + b
    residual = t + (grid(shape) + t) @ lin.T + b
    norms = np.linalg.norm(residual, axis=-1)
    inside = np.all((grid(shape) + t >= 0) & (grid(shape) + t <= np.array(shape) - 1), axis=-1)
    result = metrics.inverse_consistency(fwd, inv, mask=inside)
    assert result["mean"] == pytest.approx(norms[inside].mean(), rel=1e-12)
    assert result["max"] == pytest.approx(norms[inside].max(), rel=1e-12)


@pytest.mark.parametrize("ndims", [2, 3])
def test_inverse_consistency_matches_scipy_sampling(ndims):
    # Random fields, batched, displacements leaving the grid: compare with scipy's linear
    # map_coordinates in 'nearest' mode (border replicate = clamping the coordinates).
    rng = np.random.default_rng(10 + ndims)
    shape = SHAPES[ndims]
    fwd = rng.normal(scale=2.0, size=(2,) + shape + (ndims,))
    inv = rng.normal(scale=2.0, size=(2,) + shape + (ndims,))
    norms = []
    for b in range(2):
        coords = np.moveaxis(grid(shape) + fwd[b], -1, 0)
        sampled = np.stack([ndimage.map_coordinates(inv[b, ..., c], coords, order=1,
                                                    mode="nearest") for c in range(ndims)], -1)
        norms.append(np.linalg.norm(fwd[b] + sampled, axis=-1))
    norms = np.stack(norms)
    result = metrics.inverse_consistency(fwd, inv)
    assert result["mean"] == pytest.approx(norms.mean(), rel=1e-10)
    assert result["max"] == pytest.approx(norms.max(), rel=1e-10)
    single = metrics.inverse_consistency(fwd[1], inv[1])
    assert single["mean"] == pytest.approx(norms[1].mean(), rel=1e-10)
    mask = rng.random(shape) > 0.5
    masked = metrics.inverse_consistency(fwd, inv, mask=mask)
    assert masked["mean"] == pytest.approx(norms[:, mask].mean(), rel=1e-10)
    with pytest.raises(ValueError):
        metrics.inverse_consistency(fwd, inv[:, :-1])


# ------------------------------------------------------------------------------------- Dice

def test_dice_identical_maps():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(7, 8, 9))
    per_label, mean = metrics.dice(labels, labels.copy())
    assert sorted(per_label) == [1, 2, 3, 4, 5] and all(v == 1.0 for v in per_label.values())
    assert mean == 1.0


def test_dice_hand_computed():
    fixed = np.array([[0, 1, 1, 2],
                      [0, 1, 2, 2],
                      [3, 3, 0, 0]])
    warped = np.array([[1, 1, 0, 2],
                       [0, 1, 1, 2],
                       [0, 0, 0, 3]])
    # label 1: |A|=3, |B|=4, |A∩B|=2 -> 4/7; label 2: |A|=3, |B|=2, both 2 -> 4/5;
    # label 3: |A|=2, |B|=1, none -> 0. Background 0 is excluded.
    per_label, mean = metrics.dice(fixed, warped)
    assert list(per_label) == [1, 2, 3]
    assert per_label[1] == pytest.approx(4 / 7)
    assert per_label[2] == pytest.approx(4 / 5)
    assert per_label[3] == 0.0
    assert mean == pytest.approx((4 / 7 + 4 / 5) / 3)

    # Arguments are (fixed, warped): labels come from the fixed map only.
    per_label, _ = metrics.dice(np.where(fixed == 3, 0, fixed), warped)
    assert list(per_label) == [1, 2]

    # Explicit labels are used as given; a label absent from both maps is nan, not in the mean.
    per_label, mean = metrics.dice(fixed, warped, labels=[2, 0, 7])
    assert list(per_label) == [0, 2, 7]
    assert per_label[0] == pytest.approx(2 * 2 / (4 + 5))
    assert np.isnan(per_label[7])
    assert mean == pytest.approx((4 / 9 + 4 / 5) / 2)

    # Float maps holding integers are accepted.
    per_label, _ = metrics.dice(fixed.astype(np.float32), warped.astype(np.float64))
    assert per_label[1] == pytest.approx(4 / 7)


def test_dice_errors():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        metrics.dice(np.zeros((3, 4), int), np.zeros((4, 3), int))
    with pytest.raises(ValueError, match="integer"):
        metrics.dice(np.zeros((3, 4), int), np.full((3, 4), 0.5))
    assert metrics.dice(np.zeros((3, 4), int), np.ones((3, 4), int))[0] == {}
