"""The paper's building blocks: warp, SVF integration, field resizing, smoothing, image pyramid.

Every layer here works for 2D `(B, X, Y, C)` and 3D `(B, X, Y, Z, C)` tensors (channels last),
batched without a per-sample `map_fn`. Displacement and velocity fields are `(B, *spatial, ndims)`,
component `c` along array axis `c`, in voxels of the grid they live on; the transform is
`phi(p) = p + u(p)` and warping pulls back, `warped(p) = moving(p + u(p))` (CONVENTIONS.md).

The trilinear warp is the hot path of scaling and squaring. It is compiled with XLA on its own
(`jit_compile=True` on the warp and integration functions, and on the field resizing and the
Gaussian smoothing, whose per-axis gathers XLA fuses: 4-6x faster on full-resolution fields than
the plain graph); the convolutions of the networks stay in the plain TensorFlow graph, where
XLA's CPU convolutions were measured much slower. Set `MDREGNET_WARP_XLA=0` in the environment
(or pass `jit_compile=False`) to switch the split off, e.g. to measure it
(`experiments/benchmark_warp.py`).

Backward passes. Autodiff of a gather is a scatter-add, the slow part of training on a CPU. The
warp's gradient is therefore a custom one (`_warp_linear_vjp`: the image's part is ONE scatter of
the 2^ndims weighted corner copies, `_splat_linear`), and the gradients of the XLA resizing
(integer factors) and smoothing are those of slice-based versions of the same functions
(`_xla_vjp`); each is tested against plain autodiff. At 176x192x176 on 2 idle CPU cores
(isolated calls, forward and backward): a squaring step 485 -> 310 ms, a x2 field resize 238 ->
44 ms, the 3-tap smoothing 551 -> 117 ms.
"""

import itertools
import math
import os

import keras
import numpy as np
import tensorflow as tf

_SERIALIZABLE = keras.saving.register_keras_serializable(package="mdregnet")

#: Default for the layers' `jit_compile` argument (XLA on the warp only).
WARP_XLA_DEFAULT = os.environ.get("MDREGNET_WARP_XLA", "1") != "0"


# ------------------------------------------------------------------------------------------------
# Functional core
# ------------------------------------------------------------------------------------------------
def _check_image_and_field(image, disp):
    ndims = disp.shape[-1]
    if ndims not in (2, 3):
        raise ValueError(f"displacement must have 2 or 3 components in its last axis, got shape "
                         f"{disp.shape}")
    if image.shape.rank != ndims + 2 or disp.shape.rank != ndims + 2:
        raise ValueError(f"expected image (B, *spatial, C) and displacement (B, *spatial, {ndims}) "
                         f"of rank {ndims + 2}, got {image.shape} and {disp.shape}")
    return ndims


def _flat_strides(sizes):
    """Row-major strides of a grid of `sizes` (int32 scalars), last axis fastest."""
    strides = [None] * len(sizes)
    acc = tf.constant(1, tf.int32)
    for axis in reversed(range(len(sizes))):
        strides[axis] = acc
        acc = acc * sizes[axis]
    return strides, acc


def _sample(image, coords, interp_method="linear", fill_value=0.0):
    """Samples `image` at absolute voxel coordinates (no XLA wrapper; see `warp`).

    Args:
        image: `(B, *in_spatial, C)` tensor, any dtype for 'nearest', float for 'linear'.
        coords: list of `ndims` float32 tensors `(B, *out_spatial)`, coordinate along array axis c.
        interp_method: 'linear' (bilinear/trilinear) or 'nearest'.
        fill_value: value of points outside the volume, or None to clamp them to the border.

    Returns:
        `(B, *out_spatial, C)` samples in the dtype of `image`.
    """
    ndims = len(coords)
    shape = tf.shape(image)
    sizes = [shape[1 + c] for c in range(ndims)]
    channels = shape[-1]
    strides, n_vox = _flat_strides(sizes)
    flat = tf.reshape(image, tf.stack([-1, channels]))
    batch = tf.shape(coords[0])[0]
    offset_shape = tf.concat([[batch], tf.ones([ndims], tf.int32)], axis=0)
    batch_offset = tf.reshape(tf.range(batch, dtype=tf.int32) * n_vox, offset_shape)
    hi_bound = [tf.cast(n - 1, tf.float32) for n in sizes]

    if fill_value is None:  # border replication: clamp the sampling points into the volume
        coords = [tf.clip_by_value(x, 0.0, hi) for x, hi in zip(coords, hi_bound)]

    if interp_method == "nearest":
        idx = [tf.cast(tf.floor(x + 0.5), tf.int32) for x in coords]
        valid = None
        if fill_value is not None:
            inside = [(i >= 0) & (i < n) for i, n in zip(idx, sizes)]
            valid = tf.reduce_all(tf.stack(inside, 0), axis=0)
            idx = [tf.clip_by_value(i, 0, n - 1) for i, n in zip(idx, sizes)]
        lin = batch_offset + tf.add_n([i * s for i, s in zip(idx, strides)])
        out = tf.gather(flat, lin)
        if valid is not None:
            fill = tf.cast(fill_value, out.dtype)
            out = tf.where(valid[..., None], out, fill)
        return out

    if interp_method != "linear":
        raise ValueError(f"interp_method must be 'linear' or 'nearest', got {interp_method!r}")
    if not image.dtype.is_floating:
        raise TypeError(f"linear interpolation needs a float image, got {image.dtype.name}; "
                        "use interp_method='nearest' for label maps")

    lo = [tf.floor(x) for x in coords]
    frac = [x - f for x, f in zip(coords, lo)]  # weight of the upper corner, in [0, 1)
    lo = [tf.cast(f, tf.int32) for f in lo]
    out = None
    weight_inside = None
    for corner in itertools.product((0, 1), repeat=ndims):
        idx = [i + b for i, b in zip(lo, corner)]
        weight = None
        for b, f in zip(corner, frac):
            w = f if b else 1.0 - f
            weight = w if weight is None else weight * w
        if fill_value is not None:
            inside = [(i >= 0) & (i < n) for i, n in zip(idx, sizes)]
            inside = tf.cast(tf.reduce_all(tf.stack(inside, 0), axis=0), weight.dtype)
            weight = weight * inside
            weight_inside = weight if weight_inside is None else weight_inside + weight
        idx = [tf.clip_by_value(i, 0, n - 1) for i, n in zip(idx, sizes)]
        lin = batch_offset + tf.add_n([i * s for i, s in zip(idx, strides)])
        term = tf.cast(weight[..., None], image.dtype) * tf.gather(flat, lin)
        out = term if out is None else out + term
    if fill_value is not None and fill_value != 0:
        out = out + tf.cast((1.0 - weight_inside)[..., None] * fill_value, out.dtype)
    return out


def _sample_points(disp):
    """Absolute sampling coordinates `p + disp(p)`, one float32 `(B, *spatial)` per axis."""
    ndims = disp.shape[-1]
    shape = tf.shape(disp)
    grid = tf.meshgrid(*[tf.range(shape[1 + c], dtype=tf.float32) for c in range(ndims)],
                       indexing="ij")
    disp = tf.cast(disp, tf.float32)
    return [grid[c][None] + disp[..., c] for c in range(ndims)]


def _warp_graph(image, disp, interp_method, fill_value):
    coords = _sample_points(disp)
    if interp_method == "linear" and image.dtype != tf.float32:
        out = _sample(tf.cast(image, tf.float32), coords, interp_method, fill_value)
        return tf.cast(out, image.dtype)
    return _sample(image, coords, interp_method, fill_value)


_warp_xla = tf.function(_warp_graph, jit_compile=True, autograph=False)


def _splat_linear(image_shape, coords, upstream, fill_value):
    """Gradient of `sum(upstream * _sample(image, coords, 'linear'))` w.r.t. `image`.

    The adjoint of linear interpolation: each sample point adds `w_k * upstream` to each of its
    2^ndims corners `k`. Autodiff of the 2^ndims gathers gives 2^ndims scatter-adds of N rows of
    C values; here the 2^ndims weighted copies go in ONE scatter of N rows of 2^ndims * C values
    to the lower corner, on a grid padded by one voxel on each side (corners outside the volume
    have weight 0 or are clamped as in `_sample`), and corner k's plane is then shifted into place
    by a pad and summed. At 176x192x176 on 2 CPU cores that is ~4x faster than the 8 scatters.

    Args:
        image_shape: `[B, *in_spatial, C]` (int32 tensor or list) of the sampled image.
        coords: as `_sample`, float32 `(B, *out_spatial)` per axis.
        upstream: `(B, *out_spatial, C)` float32 gradient of the samples.
        fill_value: as `_sample` (None: points clamped into the volume).

    Returns:
        `(B, *in_spatial, C)` float32.
    """
    ndims = len(coords)
    sizes = [image_shape[1 + c] for c in range(ndims)]
    channels = image_shape[-1]
    batch = image_shape[0]
    if fill_value is None:
        coords = [tf.clip_by_value(x, 0.0, tf.cast(n - 1, tf.float32))
                  for x, n in zip(coords, sizes)]
    lo = [tf.floor(x) for x in coords]
    frac = [x - f for x, f in zip(coords, lo)]
    lo = [tf.cast(f, tf.int32) for f in lo]
    padded = [n + 2 for n in sizes]
    strides, n_vox = _flat_strides(padded)
    offset_shape = tf.concat([[batch], tf.ones([ndims], tf.int32)], axis=0)
    batch_offset = tf.reshape(tf.range(batch, dtype=tf.int32) * n_vox, offset_shape)
    # Lower corner at padded index lo + 1, clamped to [0, n]: a clamped point's corners are all
    # outside the volume (weight 0 with a fill value); without one, lo <= n - 1 already and a
    # corner at n has weight 0 (frac = 0 on the clamped face).
    base = [tf.clip_by_value(i + 1, 0, n) for i, n in zip(lo, sizes)]
    lin = batch_offset + tf.add_n([i * s for i, s in zip(base, strides)])
    corners = list(itertools.product((0, 1), repeat=ndims))
    parts = []
    for corner in corners:
        weight = None
        for b, f in zip(corner, frac):
            w = f if b else 1.0 - f
            weight = w if weight is None else weight * w
        if fill_value is not None:
            inside = [(i + b >= 0) & (i + b < n) for i, b, n in zip(lo, corner, sizes)]
            weight = weight * tf.cast(tf.reduce_all(tf.stack(inside, 0), axis=0), weight.dtype)
        parts.append(weight[..., None] * upstream)
    updates = tf.reshape(tf.stack(parts, axis=-2), tf.stack([-1, len(corners) * channels]))
    summed = tf.math.unsorted_segment_sum(updates, tf.reshape(lin, [-1]), batch * n_vox)
    summed = tf.reshape(summed, tf.concat([[batch], padded, [len(corners), channels]], axis=0))
    grad = None
    for k, corner in enumerate(corners):
        plane = summed[..., k, :]
        # corner k of the point whose lower corner is at q lies at q + corner
        plane = tf.pad(plane, [[0, 0]] + [[b, 0] for b in corner] + [[0, 0]])
        plane = plane[(slice(None),) + tuple(slice(0, n) for n in padded)]
        grad = plane if grad is None else grad + plane
    return grad[(slice(None),) + tuple(slice(1, n + 1) for n in sizes)]


def _warp_linear_vjp(image, disp, upstream, fill_value):
    """`(d image, d disp)` of `sum(upstream * warp(image, disp))` for the linear warp: the
    displacement's by autodiff (gathers only), the image's by `_splat_linear`."""
    with tf.GradientTape() as tape:
        tape.watch(disp)
        out = _warp_graph(image, disp, "linear", fill_value)
    d_disp = tape.gradient(out, disp, output_gradients=upstream)
    d_image = _splat_linear(tf.shape(image), _sample_points(disp), tf.cast(upstream, tf.float32),
                            fill_value)
    return tf.cast(d_image, image.dtype), tf.cast(d_disp, disp.dtype)


_warp_linear_vjp_xla = tf.function(_warp_linear_vjp, jit_compile=True, autograph=False)
_warp_linear_vjp_graph = tf.function(_warp_linear_vjp, autograph=False)


def _checkpointed(warp_fn, interp_method, fill_value):
    """`f(image, disp)`: `warp_fn` whose gradient is computed from its inputs alone.

    Autodiff would keep every intermediate of the trilinear warp for the backward pass (the
    coordinates, the 8 corner indices, weights and gathered values: about 30 values per voxel and
    channel), which for the 14 full-resolution squaring steps of an MDReg-Net training step at
    176x192x176 passed 20 GiB. The custom gradient keeps only the inputs and recomputes what it
    needs (`_warp_linear_vjp`, compiled with XLA when the warp is), with the image's gradient
    as one fused scatter (`_splat_linear`) instead of autodiff's eight.
    """
    if interp_method != "linear":
        return lambda image, disp: warp_fn(image, disp, interp_method, fill_value)
    vjp = _warp_linear_vjp_xla if warp_fn is _warp_xla else _warp_linear_vjp_graph

    @tf.custom_gradient
    def warp_fn_with_vjp(image, disp):
        def grad(upstream):
            return vjp(image, disp, upstream, fill_value)

        return warp_fn(image, disp, interp_method, fill_value), grad

    return warp_fn_with_vjp


def warp(image, disp, interp_method="linear", fill_value=0.0, jit_compile=None):
    """Warps `image` by the displacement `disp` (pull back): `out(p) = image(p + disp(p))`.

    Args:
        image: `(B, *spatial_in, C)` tensor; float for 'linear', any dtype for 'nearest'.
        disp: `(B, *spatial, ndims)` displacement in voxels of `image`'s grid; `spatial` may differ
            from `spatial_in` (the output takes the grid of `disp`). Cast to float32.
        interp_method: 'linear' (bi/trilinear) or 'nearest' (label maps: values are kept exactly).
        fill_value: value taken by points outside the volume (per corner for 'linear', so the
            output fades to it over one voxel, as `scipy.ndimage.map_coordinates(mode=
            'grid-constant')`), or None to replicate the border (used for warping fields).
        jit_compile: compile this function with XLA; None takes `WARP_XLA_DEFAULT`.

    Returns:
        `(B, *spatial, C)` tensor of `image.dtype`. For 'linear', the gradient recomputes the warp
        in the backward pass instead of keeping its intermediates (`_checkpointed`).

    Raises:
        ValueError: for ranks that do not match or an unknown `interp_method`.
        TypeError: for 'linear' on an integer image.

    References:
        Jaderberg et al., Spatial transformer networks, NeurIPS 2015 (sampling), as used by
        Dalca et al. 2019 and MDReg-Net (Zhuo & Fan) for `I_m o Phi`.
    """
    image = tf.convert_to_tensor(image)
    disp = tf.convert_to_tensor(disp)
    _check_image_and_field(image, disp)
    if interp_method not in ("linear", "nearest"):
        raise ValueError(f"interp_method must be 'linear' or 'nearest', got {interp_method!r}")
    if interp_method == "linear" and not image.dtype.is_floating:
        raise TypeError(f"linear interpolation needs a float image, got {image.dtype.name}; "
                        "use interp_method='nearest' for label maps")
    if fill_value is not None:
        fill_value = float(fill_value)
    use_xla = WARP_XLA_DEFAULT if jit_compile is None else jit_compile
    fn = _warp_xla if use_xla else _warp_graph
    return _checkpointed(fn, interp_method, fill_value)(image, disp)


def _integrate(vel, int_steps, warp_fn):
    disp = tf.cast(vel, tf.float32) / (2.0 ** int_steps)
    step = _checkpointed(warp_fn, "linear", None)
    for _ in range(int_steps):
        disp = disp + step(disp, disp)
    return tf.cast(disp, vel.dtype)


def integrate_svf(vel, int_steps=7, jit_compile=None):
    """Scaling and squaring: the displacement of `phi = exp(vel)` for a stationary velocity field.

    `u = vel / 2**int_steps`, then `int_steps` times `u = u + warp(u, u)` (the warp of a field
    replicates its border, so the field is extrapolated as constant outside the volume).
    The inverse transform is `integrate_svf(-vel)`.

    With XLA, each squaring step is compiled on its own: at 80x96x80 on 2 CPU cores that was
    6x faster forward and 2x faster in gradient than the plain graph, while compiling the whole
    7-step loop as one XLA program was 10x SLOWER forward (`experiments/benchmark_warp.py`).
    Each step's gradient recomputes its warp (`_checkpointed`), so the backward pass keeps one
    field per step: 1.35 instead of 2.97 GiB peak for the gradient of 7 steps and a warp at
    80x112x80, 10% more time.

    Args:
        vel: `(B, *spatial, ndims)` SVF in voxels (float; computed in float32).
        int_steps: number of squaring steps (7 in MDReg-Net and VoxelMorph); 0 returns `vel`.
        jit_compile: compile each squaring step with XLA; None takes `WARP_XLA_DEFAULT`.

    Returns:
        `(B, *spatial, ndims)` displacement in voxels, dtype of `vel`.

    References:
        Arsigny et al. 2006; Ashburner, DARTEL, NeuroImage 2007; Dalca et al. 2019, eq. 3;
        MDReg-Net, Network Architecture (7 time steps).
    """
    vel = tf.convert_to_tensor(vel)
    _check_image_and_field(vel, vel)
    if int_steps < 0:
        raise ValueError(f"int_steps must be >= 0, got {int_steps}")
    if int_steps == 0:
        return vel
    use_xla = WARP_XLA_DEFAULT if jit_compile is None else jit_compile
    return _integrate(vel, int(int_steps), _warp_xla if use_xla else _warp_graph)


def compose(disp_1, disp_2, jit_compile=None):
    """Displacement of `phi_2 o phi_1` (apply `phi_1` first): `u = u1 + warp(u2, u1)`.

    Args:
        disp_1: `(B, *spatial, ndims)` displacement of the first transform, voxels.
        disp_2: `(B, *spatial, ndims)` displacement of the second transform, voxels; sampled with
            border replication outside the volume.
        jit_compile: as `warp`.

    Returns:
        `(B, *spatial, ndims)` displacement in voxels: `p + u(p) = phi_2(phi_1(p))` with
        `phi_i(p) = p + u_i(p)` (CONVENTIONS.md, Composition).
    """
    disp_1 = tf.convert_to_tensor(disp_1)
    return disp_1 + warp(disp_2, disp_1, "linear", fill_value=None, jit_compile=jit_compile)


def _as_factors(zoom_factor, ndims):
    if isinstance(zoom_factor, (int, float)):
        factors = (float(zoom_factor),) * ndims
    else:
        factors = tuple(float(z) for z in zoom_factor)
    if len(factors) != ndims or any(z <= 0 for z in factors):
        raise ValueError(f"zoom_factor must be a positive number or {ndims} positive numbers, "
                         f"got {zoom_factor!r}")
    return factors


def _static_spatial(x):
    """Whether every spatial size of `x` is known while tracing (XLA needs them static)."""
    return x.shape.rank is not None and all(n is not None for n in x.shape[1:-1])


def _use_xla(jit_compile, x):
    """XLA for a resize or a smoothing: on by default (`WARP_XLA_DEFAULT`), static sizes only."""
    use = WARP_XLA_DEFAULT if jit_compile is None else jit_compile
    return bool(use) and _static_spatial(x)


def _resize_graph(x, factors, output_size, scale):
    """`resize` (and `rescale_field` when `scale` is given), no argument checks; see `resize`."""
    ndims = x.shape.rank - 2
    dtype = x.dtype
    for axis, s in enumerate(factors):
        if s == 1.0:
            continue
        n_static = x.shape[1 + axis]
        n = tf.shape(x)[1 + axis]
        if output_size is not None:
            m = tf.constant(output_size[axis])
        elif n_static is not None:
            m = tf.constant(int(math.floor(n_static * s + 0.5)))
        else:
            m = tf.cast(tf.round(tf.cast(n, tf.float32) * s), tf.int32)
        src = (tf.range(m, dtype=tf.float32) + 0.5) / s - 0.5
        src = tf.clip_by_value(src, 0.0, tf.cast(n - 1, tf.float32))
        lo = tf.floor(src)
        w = src - lo
        lo = tf.cast(lo, tf.int32)
        hi = tf.minimum(lo + 1, n - 1)
        bshape = [1] * (ndims + 2)
        bshape[1 + axis] = -1
        w = tf.cast(tf.reshape(w, bshape), dtype)
        x = tf.gather(x, lo, axis=1 + axis) * (1 - w) + tf.gather(x, hi, axis=1 + axis) * w
    if scale is not None:
        x = x * tf.constant(scale, x.dtype)
    return x


_resize_xla = tf.function(_resize_graph, jit_compile=True, autograph=False)


def _xla_vjp(fn):
    """`vjp(x, dy, *static) = dy^T d fn(x, *static) / dx`, compiled with XLA.

    Autodiff of the gathers in `_resize_graph` / `_smooth_graph` gives scatter-adds, which made the
    backward pass of a full-resolution resize or smoothing 7-25x slower than its forward on the
    2-core CPU. The `fn` given here computes the same values with slices, pads and reshapes
    only, so its gradient is slices and pads again; the forward pass keeps the gather version,
    which XLA runs faster.
    """
    def vjp(x, dy, *static):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, *static)
        return tape.gradient(y, x, output_gradients=dy)

    return tf.function(vjp, jit_compile=True, autograph=False)


def _integer_factors(x, factors, output_size):
    """Whether `_resize_phases` applies: static sizes, integer factors >= 1, output n * s."""
    if not _static_spatial(x) or x.shape[-1] is None:
        return False
    for axis, s in enumerate(factors):
        if s < 1.0 or abs(s - round(s)) > 1e-9:
            return False
        if output_size is not None and output_size[axis] != x.shape[1 + axis] * round(s):
            return False
    return True


def _resize_phases(x, factors, output_size, scale):
    """`_resize_graph` for integer factors, by slices (the values of the gather version).

    For factor `s`, output voxel `s*i + k` samples the input at `i + d_k`, `d_k = (k + 0.5) / s -
    0.5`: the same two neighbours and weights for every `i`, so each phase `k` is a weighted sum
    of two shifted slices of the input padded by one replicated voxel (the clamping at the
    faces), and the phases are interleaved by a stack and a reshape.
    """
    del output_size  # n * s on every axis (`_integer_factors`)
    ndims = x.shape.rank - 2
    dtype = x.dtype
    for axis, s in enumerate(factors):
        s = int(round(s))
        if s == 1:
            continue
        n = x.shape[1 + axis]
        pad = [[0, 0]] * (ndims + 2)
        pad[1 + axis] = [1, 1]
        padded = tf.pad(x, pad, mode="SYMMETRIC")  # one voxel: replicates the face
        phases = []
        for k in range(s):
            d = (k + 0.5) / s - 0.5
            lo = math.floor(d)
            w = d - lo
            index = [slice(None)] * (ndims + 2)
            index[1 + axis] = slice(lo + 1, lo + 1 + n)
            phase = padded[tuple(index)] * tf.cast(1.0 - w, dtype)
            if w:
                index[1 + axis] = slice(lo + 2, lo + 2 + n)
                phase = phase + padded[tuple(index)] * tf.cast(w, dtype)
            phases.append(phase)
        x = tf.stack(phases, axis=2 + axis)
        shape = [-1] + [int(m) for m in x.shape[1:]]
        shape[1 + axis] = n * s
        del shape[2 + axis]
        x = tf.reshape(x, shape)
    if scale is not None:
        x = x * tf.constant(scale, x.dtype)
    return x


_resize_vjp_xla = _xla_vjp(_resize_phases)


def _resize_fast(x, factors, output_size, scale):
    """`_resize_xla` forward; for integer factors, the backward pass of `_resize_phases`."""
    if not _integer_factors(x, factors, output_size):
        return _resize_xla(x, factors, output_size, scale)

    @tf.custom_gradient
    def resize_fn(x):
        def grad(dy):
            return _resize_vjp_xla(x, dy, factors, output_size, scale)

        return _resize_xla(x, factors, output_size, scale), grad

    return resize_fn(x)


def _resize_factors(x, zoom_factor, output_size):
    """Validated `(factors, output_size)` of `resize` as tuples (hashable: traced once each)."""
    ndims = x.shape.rank - 2
    if (zoom_factor is None) == (output_size is None):
        raise ValueError("give exactly one of zoom_factor and output_size")
    in_size = [x.shape[1 + a] for a in range(ndims)]
    if output_size is not None:
        output_size = tuple(int(n) for n in output_size)
        if len(output_size) != ndims or None in in_size:
            raise ValueError(f"output_size {list(output_size)} needs {ndims} static input sizes, "
                             f"got {in_size}")
        factors = tuple(o / i for o, i in zip(output_size, in_size))
    else:
        factors = _as_factors(zoom_factor, ndims)
    return factors, output_size


def resize(x, zoom_factor=None, output_size=None, jit_compile=None):
    """Linear resize of the spatial axes of `x` with voxel-centre alignment (no magnitude scaling).

    Coarse voxel `i` sits at fine coordinate `s*i + (s-1)/2` (as `tf.image.resize` with half-pixel
    centres); samples beyond the outer voxel centres replicate the border, as `tf.image.resize`.
    Separable: one two-tap gather per axis.

    Args:
        x: `(B, *spatial, C)` float tensor.
        zoom_factor: number or per-axis sequence `s`; output size `round(n * s)`.
        output_size: alternatively the output spatial size; the factor is `out / in` per axis.
        jit_compile: compile the resize with XLA (None: `WARP_XLA_DEFAULT`, on), which fuses the
            per-axis passes (4x faster for a full-resolution field on a 2-core CPU); used only
            when the spatial sizes of `x` are static.

    Returns:
        `(B, *out_spatial, C)` tensor of `x.dtype`.

    Raises:
        ValueError: if neither or both of `zoom_factor`/`output_size` are given, or for factors
            that are not positive.
    """
    x = tf.convert_to_tensor(x)
    factors, output_size = _resize_factors(x, zoom_factor, output_size)
    fn = _resize_fast if _use_xla(jit_compile, x) else _resize_graph
    return fn(x, factors, output_size, None)


def rescale_field(field, zoom_factor=None, output_size=None, jit_compile=None):
    """Resizes a displacement or velocity field AND scales its magnitude (voxel units change).

    Component `c` is multiplied by the factor of axis `c`, so a constant field `t` becomes the
    constant `s*t` and a linear field stays linear (away from the outer half voxel).

    Args:
        field: `(B, *spatial, ndims)` float tensor in voxels of its grid.
        zoom_factor: number or per-axis sequence `s` (2 = twice as many voxels per axis).
        output_size: alternatively the output spatial size.
        jit_compile: as `resize`.

    Returns:
        `(B, *out_spatial, ndims)` field in voxels of the output grid.

    References:
        CONVENTIONS.md (Resizing); VoxelMorph's ResizeTransform (Dalca et al. 2019).
    """
    field = tf.convert_to_tensor(field)
    ndims = field.shape[-1]
    if field.shape.rank != ndims + 2:
        raise ValueError(f"field must be (B, *spatial, ndims), got shape {field.shape}")
    factors, output_size = _resize_factors(field, zoom_factor, output_size)
    fn = _resize_fast if _use_xla(jit_compile, field) else _resize_graph
    return fn(field, factors, output_size, factors)


def gaussian_kernel_1d(sigma, kernel_size):
    """Normalised 1D Gaussian taps `exp(-j^2 / (2 sigma^2))`, j in [-r, r], r = kernel_size // 2."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = kernel_size // 2
    taps = np.exp(-np.arange(-r, r + 1, dtype=np.float64) ** 2 / (2.0 * sigma ** 2))
    return taps / taps.sum()


def _smooth_passes(x, taps, gather):
    """`gaussian_smooth` with the taps given, no argument checks; see `gaussian_smooth`.

    One pass per axis over the symmetrically padded input, each tap a shifted copy: taken with a
    gather (`gather=True`: the faster forward pass under XLA) or a slice (static sizes only; its
    gradient is a pad, where a gather's is a scatter-add).
    """
    ndims = x.shape.rank - 2
    r = len(taps) // 2
    for axis in range(ndims):
        pad = [[0, 0]] * (ndims + 2)
        pad[1 + axis] = [r, r]
        padded = tf.pad(x, pad, mode="SYMMETRIC")
        n = tf.shape(x)[1 + axis] if gather else x.shape[1 + axis]
        out = None
        for j, w in enumerate(taps):
            if gather:
                piece = tf.gather(padded, tf.range(j, j + n), axis=1 + axis)
            else:
                index = [slice(None)] * (ndims + 2)
                index[1 + axis] = slice(j, j + n)
                piece = padded[tuple(index)]
            term = piece * tf.cast(w, x.dtype)
            out = term if out is None else out + term
        x = out
    return x


def _smooth_graph(x, taps):
    return _smooth_passes(x, taps, gather=True)


_smooth_xla = tf.function(_smooth_graph, jit_compile=True, autograph=False)


def _smooth_slices(x, taps):
    return _smooth_passes(x, taps, gather=False)


_smooth_vjp_xla = _xla_vjp(_smooth_slices)


def _smooth_fast(x, taps):
    """`_smooth_xla` forward, the backward pass of `_smooth_slices` (see `_xla_vjp`)."""
    @tf.custom_gradient
    def smooth_fn(x):
        def grad(dy):
            return _smooth_vjp_xla(x, dy, taps)

        return _smooth_xla(x, taps), grad

    return smooth_fn(x)


def gaussian_smooth(x, sigma=1.732, kernel_size=3, jit_compile=None):
    """Separable per-channel Gaussian smoothing of the spatial axes, reflecting at the faces.

    Matches `scipy.ndimage.gaussian_filter(mode='reflect', radius=kernel_size // 2)` (symmetric
    padding `d c b a | a b c d`), so a constant field is preserved exactly, also at the faces.

    Args:
        x: `(B, *spatial, C)` float tensor (image or displacement/velocity field).
        sigma: standard deviation in voxels (1.732, ANTs' default, in MDReg-Net).
        kernel_size: odd number of taps per axis (3 in MDReg-Net).
        jit_compile: compile the smoothing with XLA (None: `WARP_XLA_DEFAULT`, on), which fuses
            the passes (6x faster for a full-resolution field on a 2-core CPU); used only when the
            spatial sizes of `x` are static.

    Returns:
        Tensor of the shape and dtype of `x`.
    """
    x = tf.convert_to_tensor(x)
    taps = gaussian_kernel_1d(sigma, kernel_size)
    if kernel_size // 2 == 0:
        return x
    taps = tuple(float(w) for w in taps)
    fn = _smooth_fast if _use_xla(jit_compile, x) else _smooth_graph
    return fn(x, taps)


def avg_pool_pyramid(image, levels, pool_size=3, strides=2):
    """Image pyramid by recursive average pooling ('SAME' padding; padding not counted).

    Returns:
        list of `levels` tensors, FINE TO COARSE: `[image, pool(image), pool(pool(image)), ...]`.
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    image = tf.convert_to_tensor(image)
    ndims = image.shape.rank - 2
    out = [image]
    for _ in range(levels - 1):
        out.append(tf.nn.avg_pool(out[-1], ksize=[pool_size] * ndims, strides=[strides] * ndims,
                                  padding="SAME"))
    return out


# ------------------------------------------------------------------------------------------------
# Keras layers
# ------------------------------------------------------------------------------------------------
@_SERIALIZABLE
class SpatialTransformer(keras.layers.Layer):
    """Warps an image by a dense displacement field (pull back), 2D or 3D.

    Args:
        interp_method: 'linear' (bi/trilinear, images) or 'nearest' (label maps).
        fill_value: value outside the volume (0 for images, label 0 for labels), or None to
            replicate the border (for warping displacement fields).
        jit_compile: compile the warp with XLA (None: `WARP_XLA_DEFAULT`, on).

    Call arguments:
        inputs: list `[image, disp]`; image `(B, *spatial_in, C)`, disp `(B, *spatial, ndims)` in
            voxels of the image grid.

    Returns:
        `(B, *spatial, C)`: `image(p + disp(p))`, dtype of the image.

    References:
        Jaderberg et al. 2015; Dalca et al. 2019; MDReg-Net (Zhuo & Fan), I_m o Phi(v~^l).
    """

    def __init__(self, interp_method="linear", fill_value=0.0, jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        if interp_method not in ("linear", "nearest"):
            raise ValueError(f"interp_method must be 'linear' or 'nearest', got {interp_method!r}")
        self.interp_method = interp_method
        self.fill_value = fill_value
        self.jit_compile = jit_compile

    def call(self, inputs):
        image, disp = inputs
        return warp(image, disp, self.interp_method, self.fill_value, self.jit_compile)

    def compute_output_shape(self, input_shape):
        image_shape, disp_shape = input_shape
        return tuple(disp_shape[:-1]) + (image_shape[-1],)

    def compute_output_spec(self, inputs):
        image, disp = inputs
        return keras.KerasTensor(tuple(disp.shape[:-1]) + (image.shape[-1],), dtype=image.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(interp_method=self.interp_method, fill_value=self.fill_value,
                      jit_compile=self.jit_compile)
        return config


@_SERIALIZABLE
class VecInt(keras.layers.Layer):
    """Integrates a stationary velocity field by scaling and squaring: `u = exp(v) - id`.

    Args:
        int_steps: number of squaring steps (7 in MDReg-Net and VoxelMorph).
        jit_compile: compile each squaring step with XLA (None: `WARP_XLA_DEFAULT`, on).

    Call arguments:
        inputs: SVF `(B, *spatial, ndims)` in voxels.

    Returns:
        `(B, *spatial, ndims)` displacement in voxels; the inverse is `VecInt()(-v)`.

    References:
        Ashburner 2007; Dalca et al. 2019 (eq. 3); MDReg-Net, Network Architecture.
    """

    def __init__(self, int_steps=7, jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        if int(int_steps) < 0:
            raise ValueError(f"int_steps must be >= 0, got {int_steps}")
        self.int_steps = int(int_steps)
        self.jit_compile = jit_compile

    def call(self, inputs):
        return integrate_svf(inputs, self.int_steps, self.jit_compile)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(int_steps=self.int_steps, jit_compile=self.jit_compile)
        return config


@_SERIALIZABLE
class ComposeTransform(keras.layers.Layer):
    """Composes two displacement fields: `phi_2 o phi_1`, i.e. `u = u1 + warp(u2, u1)`.

    Call arguments:
        inputs: list `[disp_1, disp_2]`, each `(B, *spatial, ndims)` in voxels; `disp_1` is applied
            first.

    Returns:
        `(B, *spatial, ndims)` displacement in voxels.
    """

    def __init__(self, jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        self.jit_compile = jit_compile

    def call(self, inputs):
        disp_1, disp_2 = inputs
        return compose(disp_1, disp_2, self.jit_compile)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(jit_compile=self.jit_compile)
        return config


@_SERIALIZABLE
class RescaleTransform(keras.layers.Layer):
    """Resizes a displacement or velocity field AND scales its magnitude by the zoom factor.

    Args:
        zoom_factor: number or per-axis list (2 doubles the grid and the vectors; 0.5 halves).
        jit_compile: compile the resize with XLA (None: `WARP_XLA_DEFAULT`, on; static sizes).

    Call arguments:
        inputs: `(B, *spatial, ndims)` field in voxels.

    Returns:
        `(B, *round(spatial * s), ndims)` field in voxels of the new grid; component `c` is
        multiplied by the factor of axis `c`. Coarse voxel `i` sits at fine `s*i + (s-1)/2`.

    References:
        CONVENTIONS.md; MDReg-Net (accumulated SVF v~^l resized across levels; the final SVF
        brought to full resolution by linear interpolation).
    """

    def __init__(self, zoom_factor, jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(zoom_factor, (list, tuple)):
            zoom_factor = [float(z) for z in zoom_factor]
        else:
            zoom_factor = float(zoom_factor)
        _as_factors(zoom_factor, len(zoom_factor) if isinstance(zoom_factor, list) else 1)
        self.zoom_factor = zoom_factor
        self.jit_compile = jit_compile

    def call(self, inputs):
        return rescale_field(inputs, zoom_factor=self.zoom_factor, jit_compile=self.jit_compile)

    def compute_output_shape(self, input_shape):
        ndims = len(input_shape) - 2
        factors = _as_factors(self.zoom_factor, ndims)
        spatial = [None if n is None else int(math.floor(n * s + 0.5))
                   for n, s in zip(input_shape[1:-1], factors)]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(zoom_factor=self.zoom_factor, jit_compile=self.jit_compile)
        return config


@_SERIALIZABLE
class GaussianSmooth3D(keras.layers.Layer):
    """Per-channel Gaussian smoothing, the MDReg-Net spatial smoothing layer (2D or 3D).

    Args:
        sigma: standard deviation in voxels (MDReg-Net: 1.732, ANTs' default).
        kernel_size: odd taps per axis (MDReg-Net: 3, i.e. a 3x3x3 kernel).
        ndims: 2 or 3; None infers it from the input rank (so this layer also serves 2D).
        jit_compile: compile the smoothing with XLA (None: `WARP_XLA_DEFAULT`, on; static sizes).

    Call arguments:
        inputs: `(B, *spatial, C)` float tensor, e.g. a displacement or velocity field in voxels.

    Returns:
        Same shape and dtype; faces reflect (`scipy.ndimage.gaussian_filter(mode='reflect')`), so
        constants are preserved.

    References:
        MDReg-Net, Network Architecture and Network Training (sigma = 1.732 voxels, 3x3x3);
        Avants et al. 2011 (ANTs SyN Gaussian regularisation).
    """

    def __init__(self, sigma=1.732, kernel_size=3, ndims=None, jit_compile=None, **kwargs):
        super().__init__(**kwargs)
        gaussian_kernel_1d(sigma, kernel_size)  # validates
        self.sigma = float(sigma)
        self.kernel_size = int(kernel_size)
        self.ndims = ndims
        self.jit_compile = jit_compile

    def build(self, input_shape):
        if self.ndims is not None and len(input_shape) - 2 != self.ndims:
            raise ValueError(f"{type(self).__name__} with ndims={self.ndims} got input shape "
                             f"{input_shape}")

    def call(self, inputs):
        return gaussian_smooth(inputs, self.sigma, self.kernel_size, self.jit_compile)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(sigma=self.sigma, kernel_size=self.kernel_size, ndims=self.ndims,
                      jit_compile=self.jit_compile)
        return config


@_SERIALIZABLE
class GaussianSmooth2D(GaussianSmooth3D):
    """2D counterpart of `GaussianSmooth3D` (inputs `(B, X, Y, C)`)."""

    def __init__(self, sigma=1.732, kernel_size=3, ndims=2, **kwargs):
        super().__init__(sigma=sigma, kernel_size=kernel_size, ndims=ndims, **kwargs)


@_SERIALIZABLE
class AvgPoolPyramid(keras.layers.Layer):
    """Image pyramid by recursive average pooling (MDReg-Net's multi-resolution images).

    Args:
        levels: number of images returned, the input included.
        pool_size: pooling window per axis (MDReg-Net: 3).
        strides: stride per axis (MDReg-Net: 2).

    Call arguments:
        inputs: `(B, *spatial, C)` image.

    Returns:
        list of `levels` tensors ordered FINE TO COARSE: index 0 is the input, index k has spatial
        size `ceil(n / strides**k)` ('SAME' padding, padded voxels not averaged). Models name
        their level outputs with their own paper's level index (see each model's docstring).
        Note: with an odd window and stride 2, coarse voxel `i` is centred on fine voxel `2i + 1`,
        half a fine voxel from the `2i + 0.5` of `RescaleTransform`; the paper fixes the pooling,
        and the offset (a quarter of a coarse voxel) is common to fixed and moving images.

    References:
        MDReg-Net, Network Architecture: "average pooling ... recursively with a kernel size of
        3x3x3 and a stride of 2".
    """

    def __init__(self, levels, pool_size=3, strides=2, **kwargs):
        super().__init__(**kwargs)
        if int(levels) < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = int(levels)
        self.pool_size = int(pool_size)
        self.strides = int(strides)

    def call(self, inputs):
        return avg_pool_pyramid(inputs, self.levels, self.pool_size, self.strides)

    def compute_output_shape(self, input_shape):
        shapes = []
        spatial = list(input_shape[1:-1])
        for _ in range(self.levels):
            shapes.append((input_shape[0], *spatial, input_shape[-1]))
            spatial = [None if n is None else math.ceil(n / self.strides) for n in spatial]
        return shapes

    def get_config(self):
        config = super().get_config()
        config.update(levels=self.levels, pool_size=self.pool_size, strides=self.strides)
        return config
