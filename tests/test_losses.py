"""Tests for mdregnet.losses: numeric references, edge cases, dtypes, serialisation."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from mdregnet import losses, metrics  # noqa: E402

SHAPES = {2: (20, 17), 3: (14, 12, 10)}  # anisotropic: a swapped axis changes the numbers


def smooth_image(ndims, channels=1, batch=2, seed=0, sigma=1.5):
    """Textured, smooth random image `(B, *spatial, C)` float32 with zero-mean-ish values."""
    rng = np.random.default_rng(seed)
    shape = (batch,) + SHAPES[ndims] + (channels,)
    noise = rng.standard_normal(shape)
    sig = (0,) + (sigma,) * ndims + (0,)
    img = ndimage.gaussian_filter(noise, sig)
    return (img / img.std()).astype(np.float32)


def ncc_reference(fixed, warped, window, eps=1e-5, boundary="zeros"):
    """Independent float64 squared local NCC from scipy box filters (mode='constant' = zeros)."""
    fixed = fixed.astype(np.float64)
    warped = warped.astype(np.float64)
    ndims = fixed.ndim - 2
    win = (window,) * ndims if np.isscalar(window) else tuple(window)
    size = (1,) + win
    # TF 'SAME' puts (k-1)//2 voxels before and k//2 after the centre; for even k that is
    # scipy's window shifted by origin -1.
    origin = (0,) + tuple(k % 2 - 1 for k in win)

    def box_sum(x):  # sums over the window and over the channels
        x = x.sum(axis=-1)
        return ndimage.uniform_filter(x, size=size, mode="constant", origin=origin) * np.prod(win)

    channels = fixed.shape[-1]
    if boundary == "zeros":
        n = np.prod(win) * channels
    else:
        n = box_sum(np.ones(fixed.shape[:1] + fixed.shape[1:-1] + (1,))) * channels
    # Direct form of the windowed covariance: sum (I - mean_I)(J - mean_J) over the window.
    s_i, s_j = box_sum(fixed), box_sum(warped)
    cov = box_sum(fixed * warped) - s_i * s_j / n
    var_i = np.maximum(box_sum(fixed * fixed) - s_i ** 2 / n, 0)
    var_j = np.maximum(box_sum(warped * warped) - s_j ** 2 / n, 0)
    return -np.mean(cov ** 2 / (var_i * var_j + eps))


# ------------------------------------------------------------------------------------ NCC

@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("boundary", ["zeros", "inside"])
def test_ncc_self_is_minimum(ndims, boundary):
    img = smooth_image(ndims)
    loss = losses.NCC(window=5, boundary=boundary)
    self_value = float(loss(img, img))
    # Textured windows have var ~ n >> sqrt(eps), so cc = var^2/(var^2 + eps) ~ 1.
    assert self_value == pytest.approx(-1.0, abs=1e-3)
    shifted = np.roll(img, 2, axis=1)
    noisy = img + np.random.default_rng(1).standard_normal(img.shape).astype(np.float32)
    assert float(loss(img, shifted)) > self_value + 0.05
    assert float(loss(img, noisy)) > self_value + 0.05
    # Symmetric in its arguments, bounded in [-1, 0].
    assert float(loss(shifted, img)) == pytest.approx(float(loss(img, shifted)), rel=1e-5)
    assert -1.0 - 1e-6 <= float(loss(img, noisy)) <= 0.0


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("boundary", ["zeros", "inside"])
@pytest.mark.parametrize("channels", [1, 2])
def test_ncc_matches_scipy_reference(ndims, boundary, channels):
    fixed = smooth_image(ndims, channels, seed=2)
    warped = (0.7 * fixed + 0.5 * smooth_image(ndims, channels, seed=3)).astype(np.float32)
    window = (3, 5) if ndims == 2 else (3, 5, 7)  # per-axis window: a swapped axis fails
    got = float(losses.NCC(window=window, boundary=boundary)(fixed, warped))
    want = ncc_reference(fixed, warped, window, boundary=boundary)
    # float32 windowed sums of O(1) values over <= 210 voxels: ~1e-6 relative round-off per voxel.
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("boundary", ["zeros", "inside"])
def test_ncc_even_window_matches_reference(ndims, boundary):
    fixed = smooth_image(ndims, seed=15) + 1.0
    warped = (0.5 * fixed + smooth_image(ndims, seed=16)).astype(np.float32)
    window = (4, 6) if ndims == 2 else (4, 3, 6)
    got = float(losses.NCC(window=window, boundary=boundary)(fixed, warped))
    want = ncc_reference(fixed, warped, window, boundary=boundary)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)  # float32 round-off, as above


def test_ncc_int_window_and_default_matches_reference():
    fixed = smooth_image(3, seed=4)
    warped = smooth_image(3, seed=5)
    got = float(losses.NCC()(fixed, warped))
    assert got == pytest.approx(ncc_reference(fixed, warped, 9), rel=1e-5, abs=1e-6)


def test_ncc_boundary_modes_agree_in_the_interior():
    fixed = smooth_image(3, seed=6) + 2.0  # nonzero mean: the modes differ only at borders
    warped = smooth_image(3, seed=7) + 1.0
    zeros = losses.NCC(window=3).local_cc(fixed, warped).numpy()
    inside = losses.NCC(window=3, boundary="inside").local_cc(fixed, warped).numpy()
    assert zeros.shape == fixed.shape[:-1] + (1,)
    np.testing.assert_allclose(zeros[:, 1:-1, 1:-1, 1:-1], inside[:, 1:-1, 1:-1, 1:-1],
                               rtol=1e-4, atol=1e-5)  # float32 cancellation at mean 2
    assert not np.allclose(zeros[:, 0], inside[:, 0], atol=1e-3)


def _value_and_grads(loss, a, b):
    a = tf.constant(a)
    b = tf.Variable(b)
    with tf.GradientTape() as tape:
        value = loss(a, b)
    return value.numpy(), tape.gradient(value, b).numpy()


@pytest.mark.parametrize("ndims", [2, 3])
def test_ncc_constant_images_finite(ndims):
    shape = (1,) + SHAPES[ndims] + (1,)
    zero = np.zeros(shape, np.float32)
    value, grad = _value_and_grads(losses.NCC(window=5), zero, zero)
    assert value == 0.0 and np.all(np.isfinite(grad))

    # Values that are not exact in binary and a large one (float32 cancellation in the naive
    # S[x^2] - S[x]^2/n reaches cc > 1 in flat regions at 123.456).
    flat_a = np.full(shape, 0.9137, np.float32)
    flat_b = np.full(shape, 123.456, np.float32)
    textured = smooth_image(ndims, batch=1) + 5.0
    interior = (slice(None),) + (slice(2, -2),) * ndims
    for a, b in [(flat_a, flat_a), (flat_a, flat_b), (flat_b, textured), (textured, flat_a)]:
        value, grad = _value_and_grads(losses.NCC(window=5, boundary="inside"), a, b)
        assert abs(value) < 1e-6 and np.all(np.isfinite(grad))
        # VoxelMorph zero padding: finite, and 0 wherever the window stays inside the volume.
        value, grad = _value_and_grads(losses.NCC(window=5), a, b)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        cc = losses.NCC(window=5).local_cc(a, b).numpy()
        assert np.max(cc[interior]) < 1e-6 and np.all(cc <= 1.0 + 1e-6)  # 1 ulp


def test_ncc_large_offset_matches_reference():
    # Intensities around 50: still the float64 reference to float32 precision.
    fixed = smooth_image(3, seed=17) + 50.0
    warped = (0.5 * fixed + smooth_image(3, seed=18)).astype(np.float32)
    for boundary in ("zeros", "inside"):
        got = float(losses.NCC(window=5, boundary=boundary)(fixed, warped))
        want = ncc_reference(fixed, warped, 5, boundary=boundary)
        assert got == pytest.approx(want, rel=1e-4)  # offset 50: inputs carry ~3e-6 rel error


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_ncc_low_precision_inputs(dtype):
    img = smooth_image(2, seed=8)
    other = smooth_image(2, seed=9)
    want = float(losses.NCC(window=5)(img, other))
    got = losses.NCC(window=5)(tf.cast(img, dtype), tf.cast(other, dtype))
    assert got.dtype == tf.float32
    # Only the inputs are rounded (8 / 11 mantissa bits); the arithmetic is float32.
    assert float(got) == pytest.approx(want, abs=2e-2)


def test_ncc_invalid_arguments():
    with pytest.raises(ValueError):
        losses.NCC(window=0)
    with pytest.raises(ValueError):
        losses.NCC(eps=0.0)
    with pytest.raises(ValueError):
        losses.NCC(boundary="reflect")
    with pytest.raises(ValueError, match="entries"):
        losses.NCC(window=(3, 3))(smooth_image(3), smooth_image(3))
    with pytest.raises(ValueError):
        losses.NCC()(np.zeros((4, 4, 1), np.float32), np.zeros((4, 4, 1), np.float32))


def test_ncc_inside_tf_function_with_unknown_batch():
    loss = losses.NCC(window=3)
    spec = tf.TensorSpec((None, 20, 17, 1), tf.float32)
    fn = tf.function(loss, input_signature=[spec, spec])
    img, other = smooth_image(2, seed=10), smooth_image(2, seed=11)
    assert float(fn(img, other)) == pytest.approx(float(loss(img, other)), rel=1e-6)


# ------------------------------------------------------------------------------------ MSE

def test_mse():
    a = smooth_image(3, seed=12)
    b = smooth_image(3, seed=13)
    assert float(losses.MSE()(a, b)) == pytest.approx(np.mean((a.astype(float) - b) ** 2),
                                                      rel=1e-5)
    assert float(losses.MSE()(a, a)) == 0.0
    assert losses.MSE()(tf.cast(a, tf.float16), tf.cast(b, tf.float16)).dtype == tf.float32


# ------------------------------------------------------------------------------------ Grad

def grid(shape, batch=2):
    """Voxel coordinates `(batch, *shape, ndims)` float32, component c = index along axis c."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.broadcast_to(coords, (batch,) + coords.shape).astype(np.float32)


MATRICES = {
    2: np.array([[0.3, -0.7], [0.2, 0.05]]),
    3: np.array([[0.3, -0.7, 0.1], [0.2, 0.05, -0.4], [0.6, 0.0, -0.15]]),
}


@pytest.mark.parametrize("ndims", [2, 3])
def test_grad_of_constant_field_is_zero(ndims):
    field = np.full((2,) + SHAPES[ndims] + (ndims,), 3.7, np.float32)
    assert float(losses.Grad("l1")(None, field)) == 0.0
    assert float(losses.Grad("l2")(None, field)) == 0.0


@pytest.mark.parametrize("ndims", [2, 3])
def test_grad_of_linear_field(ndims):
    m = MATRICES[ndims]
    field = (grid(SHAPES[ndims]) @ m.T).astype(np.float32)  # u_c(x) = sum_a M[c, a] x_a
    # Forward differences along a give M[:, a] at every position: mean over components, then
    # average over axes -> sum|M| / ndims^2 (l1), sum M^2 / ndims^2 (l2).
    l1 = float(losses.Grad("l1")(None, field))
    l2 = float(losses.Grad("l2")(None, field))
    assert l1 == pytest.approx(np.abs(m).sum() / ndims ** 2, rel=1e-5)
    assert l2 == pytest.approx((m ** 2).sum() / ndims ** 2, rel=1e-5)
    assert l1 != pytest.approx(l2, rel=1e-2)
    assert float(losses.Grad("l1", loss_mult=2.5)(None, field)) == pytest.approx(2.5 * l1,
                                                                                rel=1e-6)


def test_grad_single_axis_variation():
    # Slope 2 along axis 1 of component 0 only; all else constant. A differencing along the
    # batch or channel axis, or a missing average over axes/components, changes the value.
    shape = (6, 9, 5)
    field = np.zeros((3,) + shape + (3,), np.float32)
    field[..., 0] = 2.0 * grid(shape, batch=3)[..., 1]
    field += np.arange(3, dtype=np.float32)[:, None, None, None, None]  # differs per item
    assert float(losses.Grad("l1")(None, field)) == pytest.approx(2.0 / 9, rel=1e-6)
    assert float(losses.Grad("l2")(None, field)) == pytest.approx(4.0 / 9, rel=1e-6)


def test_grad_no_scale_factor_across_levels():
    # u(x) = 0.25 x_0 on a fine grid (in fine voxels). Two-fold coarser, at coarse voxel i
    # (fine coordinate 2i + 0.5) in coarse voxels: u = 0.25 (2i + 0.5) / 2 -> same slope.
    fine = np.zeros((1, 16, 8, 2), np.float32)
    fine[..., 0] = 0.25 * grid((16, 8), batch=1)[..., 0]
    coarse = np.zeros((1, 8, 4, 2), np.float32)
    coarse[..., 0] = 0.25 * (2 * grid((8, 4), batch=1)[..., 0] + 0.5) / 2
    assert float(losses.Grad()(None, coarse)) == pytest.approx(float(losses.Grad()(None, fine)),
                                                               rel=1e-6)


def test_grad_invalid_penalty():
    with pytest.raises(ValueError, match="penalty"):
        losses.Grad("l3")


# ------------------------------------------------------------------------------ bidirectional

def test_bidirectional_adds_both_directions():
    calls = []

    def similarity(y_true, y_pred):
        calls.append((y_true, y_pred))
        return tf.reduce_mean(y_true) - 2.0 * tf.reduce_mean(y_pred)  # not symmetric

    fixed, moving, warped_moving, warped_fixed = (np.full((1, 4, 4, 1), v, np.float32)
                                                  for v in (1.0, 2.0, 3.0, 5.0))
    value = losses.bidirectional(similarity, fixed, moving, warped_moving, warped_fixed)
    assert float(value) == pytest.approx((1.0 - 6.0) + (2.0 - 10.0))
    assert [(float(a[0, 0, 0, 0]), float(b[0, 0, 0, 0])) for a, b in calls] == [(1, 3), (2, 5)]

    mse = losses.MSE()
    value = losses.bidirectional(mse, fixed, moving, warped_moving, warped_fixed)
    assert float(value) == pytest.approx((1 - 3) ** 2 + (2 - 5) ** 2)


# ---------------------------------------------------------------------------- JacobianPenalty

def folding_field(shape, batch=1):
    """Component 0 decreases with slope -2 for x_0 in [4, 8]: det <= 0 on 5 slabs."""
    field = np.zeros((batch,) + shape + (len(shape),), np.float32)
    x0 = grid(shape, batch)[..., 0]
    field[..., 0] = -2.0 * (np.clip(x0, 4, 8) - 4)
    return field


@pytest.mark.parametrize("ndims", [2, 3])
def test_jacobian_penalty(ndims):
    shape = (12,) + SHAPES[ndims][1:]
    penalty = losses.JacobianPenalty()
    identity = np.zeros((2,) + shape + (ndims,), np.float32)
    assert float(penalty(None, identity)) == 0.0
    affine = (grid(shape) @ MATRICES[ndims].T).astype(np.float32)  # det(I + M) > 0
    assert np.linalg.det(np.eye(ndims) + MATRICES[ndims]) > 0
    assert float(penalty(None, affine)) == 0.0

    fold = tf.Variable(folding_field(shape))
    with tf.GradientTape() as tape:
        value = penalty(None, fold)
    grad = tape.gradient(value, fold).numpy()
    det = metrics.jacobian_determinant(fold.numpy())
    assert float(value) > 0
    assert float(value) == pytest.approx(np.mean(np.maximum(-det, 0)), rel=1e-5)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    # The margin also penalises the identity (det = 1) once eps > 1.
    assert float(losses.JacobianPenalty(eps=1.5)(None, identity)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        losses.JacobianPenalty(eps=-1.0)


# ------------------------------------------------------------------------ registry and Keras

def test_get():
    assert isinstance(losses.get("ncc", window=5), losses.NCC)
    assert losses.get("NCC", window=5).window == 5
    assert isinstance(losses.get("mse"), losses.MSE)
    assert losses.get("grad", penalty="l2").penalty == "l2"
    assert isinstance(losses.get("jacobian"), losses.JacobianPenalty)
    with pytest.raises(ValueError, match="jacobian"):
        losses.get("dice")


@pytest.mark.parametrize("loss", [
    losses.NCC(window=(3, 5, 7), eps=1e-3, boundary="inside"),
    losses.NCC(),
    losses.MSE(),
    losses.Grad("l2", loss_mult=2.0),
    losses.JacobianPenalty(eps=0.1),
])
def test_config_round_trip(loss):
    config = loss.get_config()
    assert type(loss).from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss) and restored.get_config() == config


def test_losses_train_a_keras_model():
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 2))
    field = keras.layers.Conv2D(2, 3, padding="same", name="field")(image)
    warped = keras.layers.Conv2D(1, 3, padding="same", name="warped")(image)
    model = keras.Model(image, {"warped": warped, "field": field})
    model.compile(optimizer="adam",
                  loss={"warped": losses.NCC(window=5), "field": losses.Grad("l1")},
                  loss_weights={"warped": 1.0, "field": 0.5})
    x = smooth_image(2, channels=2, batch=4, seed=14)[:, :16, :16]
    y = {"warped": x[..., :1], "field": np.zeros((4, 16, 16, 2), np.float32)}
    history = model.fit(x, y, epochs=2, batch_size=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_pair_similarity_is_forward_only_without_the_inverse_image():
    rng = np.random.default_rng(7)
    fixed, moving, warped, warped_fixed = (
        tf.constant(rng.random((1, 12, 12, 12, 1)), tf.float32) for _ in range(4))
    ncc = losses.NCC()
    forward = float(ncc(fixed, warped))
    both = float(losses.bidirectional(ncc, fixed, moving, warped, warped_fixed))
    assert float(losses.pair_similarity(ncc, fixed, moving, warped)) == pytest.approx(forward)
    assert float(losses.pair_similarity(ncc, fixed, moving, warped, warped_fixed)) == \
        pytest.approx(both)
    assert abs(both - forward) > 1e-3  # the inverse term is really added


# ======================================================================= variational Jacobian
# GlobalCC, PLS, NGF, BendingEnergy, VariationalRegulariser (Theljani & Chen).

def np_gradient(image):
    """numpy.gradient of every channel along the spatial axes of `(B, *spatial, C)`, float64."""
    ndims = image.ndim - 2
    return [np.gradient(image.astype(np.float64), axis=1 + a) for a in range(ndims)]


def global_cc_reference(fixed, warped):
    out = []
    for f, w in zip(fixed.astype(np.float64), warped.astype(np.float64)):
        rho = np.corrcoef(f.ravel(), w.ravel())[0, 1]
        out.append(1.0 - rho ** 2)
    return np.mean(out)


def pls_reference(fixed, warped, eps, normalise=False):
    a, b = np_gradient(fixed), np_gradient(warped)
    norms = np.sqrt((sum(g * g for g in a) + eps ** 2) * (sum(g * g for g in b) + eps ** 2))
    dots = np.sqrt(sum(x * y for x, y in zip(a, b)) ** 2 + eps ** 4)
    if not normalise:
        return np.mean(norms - dots)
    axes = tuple(range(1, fixed.ndim))
    return np.mean(1.0 - dots.sum(axis=axes) / norms.sum(axis=axes))


def ngf_reference(fixed, warped, eps):
    a, b = np_gradient(fixed), np_gradient(warped)
    dot = sum(x * y for x, y in zip(a, b))
    return np.mean(1.0 - dot ** 2 / ((sum(g * g for g in a) + eps ** 2)
                                     * (sum(g * g for g in b) + eps ** 2)))


def ramp(shape, weights, batch=1):
    """Linear image `sum_a weights[a] * x_a`, `(batch, *shape, 1)` float32: gradient `weights`
    everywhere, faces included (one-sided differences of a linear function are exact)."""
    return (grid(shape, batch) @ np.asarray(weights, np.float64))[..., None].astype(np.float32)


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("channels", [1, 2])
def test_global_cc_matches_numpy(ndims, channels):
    fixed = smooth_image(ndims, channels, seed=20)
    warped = (0.7 * fixed + 0.5 * smooth_image(ndims, channels, seed=21)).astype(np.float32)
    got = float(losses.GlobalCC()(fixed, warped))
    want = global_cc_reference(fixed, warped)
    assert 0.05 < want < 0.95  # a value where 1 - rho, 1 - rho^2 and rho^2 all differ
    assert got == pytest.approx(want, rel=1e-5)  # float32 means over <= 3400 voxels


@pytest.mark.parametrize("ndims", [2, 3])
def test_global_cc_is_zero_for_affine_intensity_maps(ndims):
    img = smooth_image(ndims, seed=22)
    loss = losses.GlobalCC()
    for a, b in [(1.0, 0.0), (2.5, 0.3), (-1.0, 1.0), (-0.2, 5.0)]:  # sign too: rho^2
        assert float(loss(img, a * img + b)) == pytest.approx(0.0, abs=1e-5)
    # one value per batch item, then their mean: item 1 unrelated (~1), item 0 identical (0)
    pair = np.concatenate([img[:1], smooth_image(ndims, seed=23)[:1]])
    per_item = [global_cc_reference(img[i:i + 1], pair[i:i + 1]) for i in range(2)]
    assert float(loss(img, pair)) == pytest.approx(np.mean(per_item), rel=1e-5)
    # a flat image is finite (loss 1), with finite gradients
    flat = np.full_like(img, 0.3)
    value, grad = _value_and_grads(loss, img, flat)
    assert value == pytest.approx(1.0) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("normalise", [False, True])
def test_pls_matches_numpy(ndims, normalise):
    fixed = smooth_image(ndims, channels=2, seed=24)
    warped = (0.6 * fixed + smooth_image(ndims, channels=2, seed=25)).astype(np.float32)
    for eps in (0.01, 0.5):
        got = float(losses.PLS(eps=eps, normalise=normalise)(fixed, warped))
        want = pls_reference(fixed, warped, eps, normalise)
        assert got == pytest.approx(want, rel=1e-5)  # float32 round-off of O(1) products


@pytest.mark.parametrize("ndims", [2, 3])
def test_pls_and_ngf_of_two_ramps(ndims):
    # grad T = e_0, grad R = e_0 + e_1 (45 degrees): exact values, faces included.
    shape = SHAPES[ndims]
    t = ramp(shape, [1.0] + [0.0] * (ndims - 1))
    r = ramp(shape, [1.0, 1.0] + [0.0] * (ndims - 2))
    e = 0.1
    plain = np.sqrt((1 + e ** 2) * (2 + e ** 2)) - np.sqrt(1 + e ** 4)  # ~ sqrt(2) - 1
    assert float(losses.PLS(eps=e)(r, t)) == pytest.approx(plain, rel=1e-5)
    assert float(losses.PLS(eps=e, normalise=True)(r, t)) == pytest.approx(
        1 - np.sqrt(1 + e ** 4) / np.sqrt((1 + e ** 2) * (2 + e ** 2)), rel=1e-5)
    assert float(losses.NGF(eps=e)(r, t)) == pytest.approx(
        1 - 1 / ((1 + e ** 2) * (2 + e ** 2)), rel=1e-5)
    # orthogonal level sets: NGF = 1 exactly, PLS = |a|_e |b|_e - e^2
    u = ramp(shape, [0.0, 2.0] + [0.0] * (ndims - 2))
    assert float(losses.NGF(eps=e)(t, u)) == pytest.approx(1.0, abs=1e-6)
    assert float(losses.PLS(eps=e)(t, u)) == pytest.approx(
        np.sqrt((1 + e ** 2) * (4 + e ** 2)) - e ** 2, rel=1e-5)


@pytest.mark.parametrize("ndims", [2, 3])
def test_ngf_matches_numpy(ndims):
    fixed = smooth_image(ndims, channels=2, seed=26)
    warped = (0.6 * fixed + smooth_image(ndims, channels=2, seed=27)).astype(np.float32)
    for eps in (0.01, 0.5):
        got = float(losses.NGF(eps=eps)(fixed, warped))
        assert got == pytest.approx(ngf_reference(fixed, warped, eps), rel=1e-5)


def shifted(img, offset):
    """`img` rolled by `offset` voxels along every spatial axis (periodic)."""
    return np.roll(img, offset, axis=tuple(range(1, img.ndim - 1)))


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("loss", [losses.PLS(eps=0.01), losses.PLS(eps=0.01, normalise=True),
                                  losses.NGF(eps=0.01)], ids=["pls", "pls_norm", "ngf"])
def test_multimodal_optimum_is_alignment_whatever_the_contrast(ndims, loss):
    img = smooth_image(ndims, seed=28)
    img = ((img - img.min()) / (img.max() - img.min())).astype(np.float32)  # in [0, 1]
    inverted = (1.0 - img).astype(np.float32)
    remapped = (3.0 * img ** 2).astype(np.float32)  # monotone, nonlinear: gradients parallel
    self_value = float(loss(img, img))
    # contrast inversion changes nothing: gradients flip sign, level sets stay parallel
    assert float(loss(img, inverted)) == pytest.approx(self_value, rel=1e-5, abs=1e-9)
    values = {s: float(loss(img, shifted(inverted, s))) for s in (-2, -1, 1, 2)}
    for s, value in values.items():  # every misalignment is clearly worse
        assert value > 1.5 * self_value + 1e-6, (s, value, self_value)
    assert float(loss(img, remapped)) < min(values.values())
    if isinstance(loss, losses.PLS) and not loss.normalise:
        # equal images: |a|^2 + eps^2 - sqrt(|a|^4 + eps^4) < eps^2 per voxel; any pair >= 0
        assert 0.0 <= self_value <= 0.01 ** 2
        assert min(values.values()) > 10 * 0.01 ** 2


@pytest.mark.parametrize("loss", [losses.PLS(), losses.PLS(normalise=True), losses.NGF()],
                         ids=["pls", "pls_norm", "ngf"])
def test_multimodal_flat_images_finite(loss):
    shape = (1,) + SHAPES[3] + (1,)
    flat = np.zeros(shape, np.float32)
    for other in (flat, smooth_image(3, batch=1)):
        value, grad = _value_and_grads(loss, other, flat)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert float(loss(flat, flat)) == pytest.approx(0.0 if isinstance(loss, losses.PLS) else 1.0,
                                                    abs=1e-6)


def bending_reference(field):
    """1/2 sum_c [sum_a mean(d_aa u_c)^2 + 2 sum_{a<b} mean(d_ab u_c)^2] with np.diff."""
    field = field.astype(np.float64)
    ndims = field.ndim - 2
    total = 0.0
    for c in range(field.shape[-1]):
        u = field[..., c]
        for a in range(1, ndims + 1):
            total += np.mean(np.diff(u, n=2, axis=a) ** 2)
            for b in range(a + 1, ndims + 1):
                total += 2 * np.mean(np.diff(np.diff(u, axis=a), axis=b) ** 2)
    return 0.5 * total


@pytest.mark.parametrize("ndims", [2, 3])
def test_bending_is_zero_for_affine_fields(ndims):
    shape = SHAPES[ndims]
    field = (grid(shape) @ MATRICES[ndims].T + np.arange(1, ndims + 1)).astype(np.float32)
    # float32 values up to ~20: second differences cancel to ~1e-6
    assert float(losses.BendingEnergy()(None, field)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("ndims", [2, 3])
def test_bending_of_quadratic_fields(ndims):
    shape = SHAPES[ndims]
    x = grid(shape, batch=1).astype(np.float64)
    q, k = 0.3, 0.2
    field = np.zeros((1,) + shape + (ndims,))
    field[..., 0] = q * x[..., 0] * x[..., 1]  # only d_01 u_0 = q: Hessian norm^2 = 2 q^2
    assert float(losses.BendingEnergy()(None, field.astype(np.float32))) == pytest.approx(
        q ** 2, rel=1e-4)  # float32 products of values up to ~100
    field[..., 1] = 0.5 * k * x[..., ndims - 1] ** 2  # d_aa u_1 = k: adds k^2 / 2
    assert float(losses.BendingEnergy()(None, field.astype(np.float32))) == pytest.approx(
        q ** 2 + k ** 2 / 2, rel=1e-4)


@pytest.mark.parametrize("ndims", [2, 3])
def test_bending_matches_numpy(ndims):
    field = smooth_image(ndims, channels=ndims, seed=29, sigma=1.0)
    got = float(losses.BendingEnergy()(None, field))
    assert got > 0
    assert got == pytest.approx(bending_reference(field), rel=1e-5)


def diffusion_reference(field):
    """1/2 sum_{a,c} mean over positions of the squared forward difference."""
    field = field.astype(np.float64)
    return 0.5 * sum(np.mean(np.diff(field[..., c], axis=a) ** 2)
                     for a in range(1, field.ndim - 1) for c in range(field.shape[-1]))


@pytest.mark.parametrize("ndims", [2, 3])
def test_variational_regulariser_terms(ndims):
    shape = (12,) + SHAPES[ndims][1:]
    reg = losses.VariationalRegulariser(alpha_grad=0.5, alpha_hess=2.0, alpha_jac=3.0,
                                        jac_eps=0.1)
    identity = np.zeros((2,) + shape + (ndims,), np.float32)
    assert {k: float(v) for k, v in reg.terms(identity).items()} == {
        "diffusion": 0.0, "bending": 0.0, "jacobian": 0.0}

    # affine: diffusion = 1/2 sum M^2 exactly, no bending, no folding (det(I + M) > 0.1)
    m = MATRICES[ndims]
    affine = (grid(shape) @ m.T).astype(np.float32)
    assert np.linalg.det(np.eye(ndims) + m) > 0.1
    terms = {k: float(v) for k, v in reg.terms(affine).items()}
    assert terms["diffusion"] == pytest.approx(0.5 * (m ** 2).sum(), rel=1e-5)
    assert terms["bending"] == pytest.approx(0.0, abs=1e-9)
    assert terms["jacobian"] == 0.0

    # random smooth field: numpy references for every term and the weighted sum
    field = 2.0 * smooth_image(ndims, channels=ndims, seed=30)[:, :12]
    terms = {k: float(v) for k, v in reg.terms(field).items()}
    det = metrics.jacobian_determinant(field)
    want = {"diffusion": diffusion_reference(field), "bending": bending_reference(field),
            "jacobian": np.mean(np.maximum(0.1 - det, 0.0))}
    assert want["jacobian"] > 0  # this field folds
    for key in want:
        assert terms[key] == pytest.approx(want[key], rel=1e-5), key
    assert float(reg(None, field)) == pytest.approx(
        0.5 * want["diffusion"] + 2.0 * want["bending"] + 3.0 * want["jacobian"], rel=1e-5)


@pytest.mark.parametrize("ndims", [2, 3])
def test_variational_jacobian_term_penalises_folding(ndims):
    shape = (12,) + SHAPES[ndims][1:]
    fold = tf.Variable(folding_field(shape))  # det = -1 on a slab, det = 1 elsewhere
    det = metrics.jacobian_determinant(fold.numpy())
    assert det.min() <= 0
    reg = losses.VariationalRegulariser(alpha_grad=0.0, alpha_hess=0.0, jac_eps=0.0)
    with tf.GradientTape() as tape:
        value = reg(None, fold)
    assert float(value) == pytest.approx(np.mean(np.maximum(-det, 0.0)), rel=1e-5)
    grad = tape.gradient(value, fold).numpy()
    assert float(value) > 0 and np.any(grad != 0) and np.all(np.isfinite(grad))
    # det = 0 exactly (a collapse along axis 0) costs nothing with eps = 0, jac_eps with eps > 0
    collapse = np.zeros((1,) + shape + (ndims,), np.float32)
    collapse[..., 0] = -grid(shape, batch=1)[..., 0]
    assert np.allclose(metrics.jacobian_determinant(collapse), 0.0)
    assert float(reg.terms(collapse)["jacobian"]) == 0.0
    margin = losses.VariationalRegulariser(jac_eps=0.1)
    assert float(margin.terms(collapse)["jacobian"]) == pytest.approx(0.1, rel=1e-5)


def test_variational_losses_registry_and_config():
    assert isinstance(losses.get("cc"), losses.GlobalCC)
    assert losses.get("pls", eps=0.2, normalise=True).normalise is True
    assert isinstance(losses.get("ngf"), losses.NGF)
    assert isinstance(losses.get("bending"), losses.BendingEnergy)
    assert losses.get("variational", alpha_jac=5.0).alpha_jac == 5.0
    for loss in (losses.GlobalCC(eps=1e-6), losses.PLS(eps=0.05, normalise=True),
                 losses.NGF(eps=0.2), losses.BendingEnergy(),
                 losses.VariationalRegulariser(alpha_grad=0.3, jac_eps=0.2)):
        config = loss.get_config()
        assert type(loss).from_config(config).get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(restored) is type(loss) and restored.get_config() == config
    for cls in (losses.GlobalCC, losses.PLS, losses.NGF):
        with pytest.raises(ValueError):
            cls(eps=0.0)
    with pytest.raises(ValueError):
        losses.VariationalRegulariser(alpha_hess=-1.0)
    with pytest.raises(ValueError):
        losses.VariationalRegulariser(jac_eps=-0.1)
    with pytest.raises(ValueError, match="channel"):
        losses.PLS()(smooth_image(2, channels=2), smooth_image(2))
