"""Layers against independent references (scipy.ndimage) and analytic fields."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from mdregnet import layers

RNG = np.random.default_rng(1234)


def smooth_field(shape, ndims, amplitude, sigma=3.0, seed=0):
    """Random smooth field `(B, *shape, ndims)` with max |u| == amplitude voxels."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(shape[0], *shape[1:], ndims))
    f = ndimage.gaussian_filter(f, [0] + [sigma] * ndims + [0])
    return (f / np.abs(f).max() * amplitude).astype(np.float32)


def grid_of(spatial):
    return np.stack(np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij"), -1)


def scipy_warp(image, disp, order=1, mode="grid-constant", cval=0.0):
    """Reference pull-back warp with map_coordinates, per batch item and channel."""
    spatial = disp.shape[1:-1]
    coords = grid_of(spatial)[None] + disp
    out = np.zeros(disp.shape[:-1] + image.shape[-1:], np.float64)
    for b in range(image.shape[0]):
        pts = np.moveaxis(coords[b], -1, 0)
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c].astype(np.float64), pts,
                                                     order=order, mode=mode, cval=cval)
    return out


DIMS = [(2, (2, 23, 19)), (3, (2, 14, 17, 12))]


@pytest.mark.parametrize("ndims,shape", DIMS)
@pytest.mark.parametrize("xla", [True, False])
def test_warp_matches_map_coordinates(ndims, shape, xla):
    image = RNG.random(shape + (2,)).astype(np.float32)
    disp = smooth_field(shape, ndims, amplitude=4.0)
    out = layers.warp(image, disp, jit_compile=xla).numpy()
    ref = scipy_warp(image, disp)
    # float32 trilinear sums of values in [0,1]: agreement ~1e-6 everywhere, borders included.
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert out.shape == shape + (2,) and out.dtype == np.float32


@pytest.mark.parametrize("ndims,shape", DIMS)
def test_warp_border_mode_matches_nearest_extension(ndims, shape):
    image = RNG.random(shape + (1,)).astype(np.float32)
    disp = smooth_field(shape, ndims, amplitude=6.0, seed=3)
    out = layers.warp(image, disp, fill_value=None).numpy()
    ref = scipy_warp(image, disp, mode="nearest")
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("ndims,shape", DIMS)
def test_integer_translation_is_exact_shift(ndims, shape):
    image = RNG.random(shape + (1,)).astype(np.float32)
    t = [2, -1, 3][:ndims]
    disp = np.broadcast_to(np.array(t, np.float32), shape + (ndims,))
    out = layers.warp(image, disp).numpy()
    # out[p] = image[p + t]: compare the region where p + t is inside.
    src = tuple(slice(max(k, 0), n + min(k, 0)) for k, n in zip(t, shape[1:]))
    dst = tuple(slice(max(-k, 0), n + min(-k, 0)) for k, n in zip(t, shape[1:]))
    np.testing.assert_array_equal(out[(slice(None),) + dst], image[(slice(None),) + src])
    # and the parts pulled from outside are the fill value 0
    mask = np.ones(shape, bool)
    mask[(slice(None),) + dst] = False
    assert np.all(out[mask] == 0)


def test_fractional_translation_along_each_axis():
    """A half-voxel shift along axis c averages neighbours along axis c only (axis order)."""
    image = RNG.random((1, 8, 9, 10, 1)).astype(np.float32)
    for axis in range(3):
        t = np.zeros(3, np.float32)
        t[axis] = 0.5
        disp = np.broadcast_to(t, (1, 8, 9, 10, 3))
        out = layers.warp(image, disp).numpy()
        lo = [slice(None)] * 5
        hi = [slice(None)] * 5
        lo[1 + axis] = slice(0, -1)
        hi[1 + axis] = slice(1, None)
        expect = 0.5 * (image[tuple(lo)] + image[tuple(hi)])
        np.testing.assert_allclose(out[tuple(lo)], expect, atol=1e-6)


def test_nonzero_fill_value():
    image = np.ones((1, 6, 6, 6, 1), np.float32)
    disp = np.full((1, 6, 6, 6, 3), 100.0, np.float32)
    out = layers.warp(image, disp, fill_value=-2.0).numpy()
    np.testing.assert_allclose(out, -2.0)
    disp = np.zeros((1, 6, 6, 6, 3), np.float32)
    disp[..., 0] = 5.5  # half outside along the last voxel: 0.5*1 + 0.5*(-2)
    out = layers.warp(image, disp, fill_value=-2.0).numpy()
    np.testing.assert_allclose(out[0, 0], -0.5, atol=1e-6)


@pytest.mark.parametrize("ndims,shape", DIMS)
def test_nearest_keeps_label_values(ndims, shape):
    labels = RNG.choice([0, 3, 17, 255], size=shape + (1,)).astype(np.int32)
    disp = smooth_field(shape, ndims, amplitude=3.0, seed=5)
    out = layers.warp(labels, disp, interp_method="nearest").numpy()
    assert out.dtype == np.int32
    assert set(np.unique(out)) <= {0, 3, 17, 255}
    ref = scipy_warp(labels.astype(np.float64), disp, order=0, mode="grid-constant")
    # order-0 rounding ties may differ (x.5 exactly): allow a tiny fraction of voxels.
    assert np.mean(out != ref) < 1e-3


def test_linear_on_integer_image_raises():
    with pytest.raises(TypeError, match="nearest"):
        layers.warp(np.zeros((1, 4, 4, 4, 1), np.int32), np.zeros((1, 4, 4, 4, 3), np.float32))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="rank"):
        layers.warp(np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 4, 4, 4, 3), np.float32))


def test_warp_gradient_matches_finite_differences():
    image = ndimage.gaussian_filter(RNG.random((1, 10, 10, 10, 1)), 1.5).astype(np.float32)
    disp = tf.Variable(smooth_field((1, 10, 10, 10), 3, 1.3, seed=7))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layers.warp(image, disp) ** 2)
    g = tape.gradient(loss, disp).numpy()
    idx, comp, h = (0, 5, 4, 6), 1, 1e-2
    d0 = disp.numpy()
    vals = []
    for sgn in (1, -1):
        d = d0.copy()
        d[idx + (comp,)] += sgn * h
        vals.append(float(tf.reduce_sum(layers.warp(image, d) ** 2)))
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(g[idx + (comp,)] - fd) < 1e-2 * max(1.0, abs(fd))


# ------------------------------------------------------------------------------------------------
# VecInt / compose
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndims,shape", DIMS)
def test_vecint_zero_and_constant(ndims, shape):
    zero = np.zeros(shape + (ndims,), np.float32)
    np.testing.assert_array_equal(layers.VecInt()(zero).numpy(), 0.0)
    t = np.array([1.5, -2.25, 0.75][:ndims], np.float32)
    const = np.broadcast_to(t, shape + (ndims,)).copy()
    # A constant velocity flows to the same constant displacement (border replication keeps the
    # field constant everywhere, also at the faces).
    np.testing.assert_allclose(layers.VecInt(7)(const).numpy(), const, atol=1e-5)


def test_vecint_matches_euler_integration_of_the_flow():
    """Against an independent ODE solution: many small Euler steps of d phi/dt = v(phi)."""
    shape = (1, 24, 24, 24)
    v = smooth_field(shape, 3, amplitude=3.0, sigma=4.0, seed=11)
    u = layers.integrate_svf(v, 7).numpy()
    grid = grid_of(shape[1:]).astype(np.float64)
    pos = grid.copy()
    steps = 256
    for _ in range(steps):
        vel = np.stack([ndimage.map_coordinates(v[0, ..., c].astype(np.float64),
                                                np.moveaxis(pos, -1, 0), order=1, mode="nearest")
                        for c in range(3)], -1)
        pos += vel / steps
    ref = pos - grid
    inner = (slice(6, -6),) * 3
    err = np.abs(u[0][inner] - ref[inner]).max()
    # scaling and squaring with 7 steps vs 256 Euler steps: both O(1e-2) voxel for |v| = 2.
    assert err < 0.05, err
    assert np.abs(ref[inner]).max() > 1.0  # the flow is not trivial


@pytest.mark.parametrize("ndims,shape", DIMS)
def test_exp_v_and_exp_minus_v_compose_to_identity(ndims, shape):
    v = smooth_field(shape, ndims, amplitude=2.0, sigma=3.0, seed=2)
    fwd = layers.integrate_svf(v)
    inv = layers.integrate_svf(-v)
    comp = layers.ComposeTransform()([fwd, inv]).numpy()
    inner = (slice(None),) + (slice(3, -3),) * ndims
    assert np.abs(comp[inner]).max() < 0.05
    assert np.abs(fwd.numpy()).max() > 1.0


def test_small_smooth_svf_is_fold_free():
    v = smooth_field((1, 20, 20, 20), 3, amplitude=3.0, sigma=3.0, seed=4)
    u = layers.integrate_svf(v).numpy()[0]
    grads = [np.gradient(u[..., c], axis=a) for c in range(3) for a in range(3)]
    jac = np.stack(grads, -1).reshape(u.shape[:3] + (3, 3)) + np.eye(3)
    assert np.linalg.det(jac).min() > 0


def test_compose_translations_add():
    a = np.broadcast_to(np.array([1.0, 2.0, -1.0], np.float32), (1, 8, 8, 8, 3))
    b = np.broadcast_to(np.array([0.5, -3.0, 2.0], np.float32), (1, 8, 8, 8, 3))
    np.testing.assert_allclose(layers.compose(a, b).numpy(), a + b, atol=1e-6)


def test_compose_order():
    """(phi2 o phi1)(p) = phi1(p) + u2(phi1(p)): u1 a translation, u2 linear in x0."""
    shape = (1, 12, 12, 12)
    grid = grid_of(shape[1:]).astype(np.float32)
    u1 = np.zeros(shape + (3,), np.float32)
    u1[..., 0] = 2.0
    u2 = np.zeros(shape + (3,), np.float32)
    u2[..., 1] = 0.1 * grid[None, ..., 0]
    out = layers.compose(u1, u2).numpy()
    inner = (0, slice(1, 8), slice(None), slice(None))
    np.testing.assert_allclose(out[inner + (1,)], 0.1 * (grid[..., 0][inner[1:]] + 2.0), atol=1e-5)
    np.testing.assert_allclose(out[inner + (0,)], 2.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# RescaleTransform
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zoom", [2.0, 0.5, 4.0, [2.0, 1.0, 0.5]])
def test_rescale_constant_field(zoom):
    t = np.array([1.0, -2.0, 3.0], np.float32)
    field = np.broadcast_to(t, (2, 8, 8, 8, 3)).copy()
    out = layers.RescaleTransform(zoom)(field).numpy()
    z = np.broadcast_to(np.asarray(zoom, np.float32), (3,))
    assert out.shape == (2,) + tuple(int(8 * s) for s in z) + (3,)
    np.testing.assert_allclose(out, np.broadcast_to(t * z, out.shape), atol=1e-6)


@pytest.mark.parametrize("zoom", [2.0, 4.0])
def test_rescale_linear_field_stays_linear(zoom):
    """u_c(i) = a_c * i_{c'} on the coarse grid becomes s * a_c * ((x - (s-1)/2) / s) finely."""
    n = 8
    coarse = grid_of((n, n, n)).astype(np.float32)
    field = np.zeros((1, n, n, n, 3), np.float32)
    field[0, ..., 0] = 0.3 * coarse[..., 1]  # component 0 varies along axis 1
    field[0, ..., 2] = -0.2 * coarse[..., 0] + 1.0
    out = layers.RescaleTransform(zoom)(field).numpy()[0]
    m = int(n * zoom)
    fine = grid_of((m, m, m)).astype(np.float64)
    ci = (fine - (zoom - 1) / 2) / zoom  # coarse coordinate of each fine voxel centre
    exp0 = zoom * 0.3 * ci[..., 1]
    exp2 = zoom * (-0.2 * ci[..., 0] + 1.0)
    # interior: fine voxels whose coarse coordinate lies between coarse voxel centres 0..n-1
    inside = np.all((ci >= 0) & (ci <= n - 1), axis=-1)
    np.testing.assert_allclose(out[..., 0][inside], exp0[inside], atol=1e-5)
    np.testing.assert_allclose(out[..., 2][inside], exp2[inside], atol=1e-5)
    np.testing.assert_allclose(out[..., 1], 0.0, atol=1e-7)


def test_rescale_matches_tf_image_resize_in_2d():
    field = RNG.random((2, 6, 7, 2)).astype(np.float32)
    out = layers.rescale_field(field, zoom_factor=2).numpy()
    ref = tf.image.resize(field, (12, 14), method="bilinear").numpy() * 2.0
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_rescale_output_size():
    field = np.ones((1, 5, 6, 7, 3), np.float32)
    out = layers.rescale_field(field, output_size=(10, 12, 7)).numpy()
    assert out.shape == (1, 10, 12, 7, 3)
    np.testing.assert_allclose(out[0, 0, 0, 0], [2.0, 2.0, 1.0], atol=1e-6)


def test_rescale_bad_factor():
    with pytest.raises(ValueError):
        layers.RescaleTransform(-1.0)


# ------------------------------------------------------------------------------------------------
# GaussianSmooth3D, AvgPoolPyramid
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,ksize", [(1.732, 3), (1.0, 5), (2.0, 7)])
def test_gaussian_matches_scipy(sigma, ksize):
    x = RNG.random((2, 10, 11, 12, 3)).astype(np.float32)
    out = layers.GaussianSmooth3D(sigma, ksize)(x).numpy()
    ref = np.stack([np.stack([ndimage.gaussian_filter(x[b, ..., c].astype(np.float64), sigma,
                                                      mode="reflect", radius=ksize // 2)
                              for c in range(3)], -1) for b in range(2)])
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_gaussian_preserves_constants_and_smooths():
    x = np.full((1, 6, 6, 6, 3), 2.5, np.float32)
    np.testing.assert_allclose(layers.GaussianSmooth3D()(x).numpy(), 2.5, atol=1e-6)
    noise = RNG.normal(size=(1, 16, 16, 16, 1)).astype(np.float32)
    assert layers.GaussianSmooth3D()(noise).numpy().std() < 0.7 * noise.std()


def test_gaussian_2d():
    x = RNG.random((1, 9, 8, 2)).astype(np.float32)
    out = layers.GaussianSmooth2D()(x).numpy()
    ref = ndimage.gaussian_filter(x[0, ..., 1].astype(np.float64), 1.732, mode="reflect", radius=1)
    np.testing.assert_allclose(out[0, ..., 1], ref, atol=1e-6)
    with pytest.raises(ValueError):
        layers.GaussianSmooth3D(ndims=3)(x)


def test_avg_pool_pyramid_fine_to_coarse():
    x = RNG.random((1, 16, 16, 16, 1)).astype(np.float32)
    pyr = layers.AvgPoolPyramid(levels=3)(x)
    assert [p.shape[1:4] for p in pyr] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    np.testing.assert_array_equal(pyr[0].numpy(), x)
    # coarse voxel i averages fine voxels 2i..2i+2 (SAME padding: 0 before, 1 after)
    ref = ndimage.uniform_filter(x[0, ..., 0].astype(np.float64), 3, mode="constant")
    np.testing.assert_allclose(pyr[1].numpy()[0, 1:-1, 1:-1, 1:-1, 0], ref[3:-2:2, 3:-2:2, 3:-2:2],
                               atol=1e-6)
    const = np.full((1, 16, 16, 16, 1), 3.0, np.float32)
    for p in layers.AvgPoolPyramid(levels=4)(const):  # padding is not averaged in
        np.testing.assert_allclose(p.numpy(), 3.0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Keras plumbing: config round trip, functional models, tf.function, strategy, mixed precision
# ------------------------------------------------------------------------------------------------
LAYERS = [
    layers.SpatialTransformer(interp_method="nearest", fill_value=None),
    layers.VecInt(int_steps=5, jit_compile=False),
    layers.RescaleTransform([2.0, 1.0, 0.5]),
    layers.GaussianSmooth3D(sigma=1.0, kernel_size=5),
    layers.GaussianSmooth2D(),
    layers.AvgPoolPyramid(levels=4, pool_size=3, strides=2),
    layers.ComposeTransform(jit_compile=True),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: type(l).__name__)
def test_config_round_trip(layer):
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()


def test_layers_in_functional_model_and_tf_function():
    moving = keras.Input((16, 16, 16, 1))
    vel = keras.Input((8, 8, 8, 3))
    v_full = layers.RescaleTransform(2)(vel)
    v_full = layers.GaussianSmooth3D()(v_full)
    disp = layers.VecInt()(v_full)
    warped = layers.SpatialTransformer()([moving, disp])
    pyr = layers.AvgPoolPyramid(3)(warped)
    model = keras.Model([moving, vel], [warped, disp] + pyr)
    m = RNG.random((2, 16, 16, 16, 1)).astype(np.float32)
    v = smooth_field((2, 8, 8, 8), 3, 1.0)
    eager = model([m, v])
    graph = tf.function(lambda a, b: model([a, b]))(m, v)
    for a, b in zip(eager, graph):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert eager[0].shape == (2, 16, 16, 16, 1) and eager[-1].shape == (2, 4, 4, 4, 1)


def test_under_distribution_strategy():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    m = RNG.random((1, 8, 8, 8, 1)).astype(np.float32)
    v = smooth_field((1, 8, 8, 8), 3, 1.0)
    with strategy.scope():
        inp = keras.Input((8, 8, 8, 3))
        model = keras.Model(inp, layers.VecInt()(inp))
    out = strategy.run(tf.function(lambda x: model(x)), args=(v,))
    ref = layers.integrate_svf(v).numpy()
    np.testing.assert_allclose(strategy.experimental_local_results(out)[0].numpy(), ref, atol=1e-6)
    del m


def test_mixed_precision_dtypes():
    image = RNG.random((1, 8, 8, 8, 1)).astype(np.float16)
    disp = smooth_field((1, 8, 8, 8), 3, 1.0).astype(np.float16)
    out = layers.SpatialTransformer(dtype="mixed_float16")([image, disp])
    assert out.dtype == tf.float16
    labels = RNG.integers(0, 9, (1, 8, 8, 8, 1)).astype(np.int32)
    warped_labels = layers.SpatialTransformer("nearest", dtype="mixed_float16")([labels, disp])
    assert warped_labels.dtype == tf.int32
    ref = layers.warp(image.astype(np.float32), disp.astype(np.float32)).numpy()
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref, atol=2e-3)
    u = layers.VecInt(dtype="mixed_float16")(disp)
    assert u.dtype == tf.float16
    smoothed = layers.GaussianSmooth3D(dtype="mixed_float16")(disp)
    assert smoothed.dtype == tf.float16


@pytest.mark.parametrize("op, shape, arg", [
    ("rescale", (6, 5, 7), 2), ("rescale", (3, 4, 5), 8), ("rescale", (4, 5, 3), (3, 1, 2)),
    ("rescale", (6, 7), 2), ("resize", (5, 6, 4), 4), ("rescale", (6, 5, 7), 0.5),
    ("smooth", (6, 5, 7), 1.732), ("smooth", (6, 7), 1.0)])
def test_gradients_of_resize_and_smoothing_are_the_adjoints(op, shape, arg):
    """The XLA paths give the gradients of their forward pass: the gradient of <f(x), y> is the
    plain-graph autodiff one, and <f(x), y> = <x, f^T(y)> (f is linear), for integer factors
    (slice-based backward pass) and others (autodiff of the gathers)."""
    ndims = len(shape)
    x = tf.constant(RNG.normal(size=(2, *shape, ndims)).astype(np.float32))

    def f(t, xla):
        if op == "rescale":
            return layers.rescale_field(t, arg, jit_compile=xla)
        if op == "resize":
            return layers.resize(t, arg, jit_compile=xla)
        return layers.gaussian_smooth(t, sigma=arg, kernel_size=3, jit_compile=xla)

    y = tf.constant(RNG.normal(size=f(x, False).shape).astype(np.float32))
    grads = []
    for xla in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            inner = tf.reduce_sum(f(x, xla) * y)
        grads.append(tape.gradient(inner, x).numpy())
    scale = np.abs(grads[1]).max()  # sums of up to 8^3 products of O(1) values
    np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=1e-5 * scale)
    lhs = float(tf.reduce_sum(f(x, True) * y))
    rhs = float(np.sum(x.numpy() * grads[0]))
    assert lhs == pytest.approx(rhs, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("ndims, fill_value, image_shape", [
    (3, None, (7, 6, 5)), (3, 0.0, (7, 6, 5)), (3, 0.5, (4, 5, 6)), (2, None, (9, 8)),
    (2, 0.0, (5, 11))])
@pytest.mark.parametrize("xla", [True, False])
def test_warp_gradient_is_autodiff_of_the_gathers(ndims, fill_value, image_shape, xla):
    """The warp's custom gradient (one fused scatter for the image, autodiff for the field) equals
    plain autodiff of the 2^ndims gathers, for displacements reaching past the faces."""
    shape = (7, 6, 5) if ndims == 3 else (9, 8)
    image = tf.constant(RNG.normal(size=(2, *image_shape, 2)).astype(np.float32))
    disp = tf.constant((RNG.normal(size=(2, *shape, ndims)) * 2.5).astype(np.float32))
    upstream = tf.constant(RNG.normal(size=(2, *shape, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([image, disp])
        out = layers.warp(image, disp, fill_value=fill_value, jit_compile=xla)
    got = tape.gradient(out, [image, disp], output_gradients=upstream)
    with tf.GradientTape() as tape:
        tape.watch([image, disp])
        out = layers._warp_graph(image, disp, "linear", fill_value)
    want = tape.gradient(out, [image, disp], output_gradients=upstream)
    for g, w, name in zip(got, want, ("image", "disp")):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-5, err_msg=name)
