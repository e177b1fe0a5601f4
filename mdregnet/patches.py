"""Patch training and patch inference (the patch-based diffeomorphic FCN, `models.patch_fcn`).

Wu et al., "Fast diffeomorphic image registration using patch based fully convolutional networks"
(`../shared/papers/patch-based-diffeomorphic-fcn.md`), II-D:
  * training: "our patch-based networks are trained by the fixed size of image patch pairs, and a
    Dense training scheme [2] is adopted to equally sample the patch pairs from foreground and
    background. The size of the training patches is set to be 64x64x64 and the batch size is set
    to be 16" -> `sample_patch_pairs`, `patch_pair_dataset`;
  * testing: "velocity field vectors only located in a cubic (with the size of 32x32x32) at the
    center of each patch are considered" -> `predict_by_patches`, `register_by_patches`.

Patch geometry. A patch of size `p` centred on voxel `c` covers `[c - p//2, c - p//2 + p)` per axis;
voxels outside the volume are 0 (CONVENTIONS: outside the volume an image is 0). At inference the
volume is tiled by the central `keep`^d cubes of patches taken with stride `keep`: the volume is
zero-padded by `m = (p - keep) / 2` before and by `m` plus the round-up to a multiple of `keep`
after, so every voxel lies in exactly one kept cube and every kept cube has `m` voxels of context
on each side (also at the volume's faces, where the context is zero padding).

What is stitched: the VELOCITY. The paper keeps "velocity field vectors" of each patch's centre,
and it is the right field to stitch: the stitched SVF, integrated once over the whole volume by
scaling and squaring, is `exp` of one (piecewise smooth) velocity field, a diffeomorphism whose
inverse is `exp(-v)`; its integration reads the neighbouring patches' velocities where the flow
leaves a cube. Stitching displacements (each `exp` of its own patch velocity, integrated with
the patch border replicated) would give a field that is the flow of no velocity, is wrong where a
trajectory leaves its patch, and can fold across the seams. For the cascade, each stage is run by
patches on the moving image warped by the composition of the stages before it (whole volume),
integrated, and composed, as the model does.
"""

import itertools
import math

import numpy as np

__all__ = ["foreground_mask", "extract_patch", "sample_patch_pairs", "patch_pair_dataset",
           "tile_starts", "predict_by_patches", "register_by_patches"]


def _spatial(x, name):
    """`x` as a float32 array of the spatial axes only.

    Accepts `(X, Y, Z)`, `(X, Y, Z, 1)`, `(1, X, Y, Z, 1)` (3D) and `(X, Y)`, `(1, X, Y, 1)` (2D).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 5 and x.shape[0] == 1 and x.shape[-1] == 1:
        x = x[0, ..., 0]
    elif x.ndim == 4 and x.shape[0] == 1 and x.shape[-1] == 1:
        x = x[0, ..., 0]
    elif x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be one 2D or 3D image ((X, Y, Z), (X, Y, Z, 1), "
                         f"(1, X, Y, Z, 1), (X, Y) or (1, X, Y, 1)), got shape {x.shape}")
    return x


def foreground_mask(moving, fixed, threshold=0.01):
    """Foreground of a pair: voxels where either image exceeds `threshold` (intensities in [0, 1]).

    Returns:
        bool array of the spatial shape.
    """
    return (np.asarray(moving) > threshold) | (np.asarray(fixed) > threshold)


def extract_patch(volume, start, size):
    """The patch `volume[start : start + size]` (per axis), zero where it leaves the volume.

    Args:
        volume: `(*S)` array; start: per-axis start (may be negative); size: per-axis size.

    Returns:
        `(*size)` array of `volume.dtype`.
    """
    out = np.zeros(tuple(size), dtype=volume.dtype)
    src, dst = [], []
    for s, n, total in zip(start, size, volume.shape):
        lo, hi = max(s, 0), min(s + n, total)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sample_patch_pairs(moving, fixed, patch_size=64, count=2, seed=0, threshold=0.01):
    """Samples patch pairs, half centred in the foreground and half in the background.

    The paper's "Dense training scheme ... to equally sample the patch pairs from foreground and
    background": `ceil(count / 2)` centres are drawn uniformly (with replacement) among the
    foreground voxels of the pair (`foreground_mask`) and `floor(count / 2)` among the background
    voxels; if one of the two sets is empty, all centres come from the other. The same centre is
    used in both images; patches are zero outside the volume (`extract_patch`). Order shuffled.

    Args:
        moving, fixed: images of one grid, `(*S)` (or `(*S, 1)`, `(1, *S, 1)`), intensities in
            [0, 1]; 2D or 3D.
        patch_size: int or per-axis sizes (paper: 64).
        count: number of pairs.
        seed: int or sequence of ints for `numpy.random.default_rng` (deterministic).
        threshold: foreground threshold on the intensities.

    Returns:
        `(moving_patches, fixed_patches, centres, foreground)`: two float32 arrays
        `(count, *patch)`, the int centres `(count, ndims)` and a bool array `(count,)` saying
        which centres were drawn from the foreground.
    """
    moving = _spatial(moving, "moving")
    fixed = _spatial(fixed, "fixed")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} must share one grid")
    ndims = moving.ndim
    size = (int(patch_size),) * ndims if np.isscalar(patch_size) else tuple(map(int, patch_size))
    if len(size) != ndims or min(size) < 1:
        raise ValueError(f"patch_size must be a positive int or {ndims} of them, got {patch_size}")
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    mask = foreground_mask(moving, fixed, threshold).ravel()
    fg, bg = np.flatnonzero(mask), np.flatnonzero(~mask)
    n_fg = (count + 1) // 2
    if fg.size == 0:
        n_fg = 0
    elif bg.size == 0:
        n_fg = count
    flat = np.concatenate([fg[rng.integers(0, fg.size, n_fg)] if n_fg else fg[:0],
                           bg[rng.integers(0, bg.size, count - n_fg)] if count - n_fg else bg[:0]])
    foreground = np.arange(count) < n_fg
    order = rng.permutation(count)
    flat, foreground = flat[order], foreground[order]
    centres = np.stack(np.unravel_index(flat, moving.shape), axis=-1).astype(np.int64)
    half = np.array([n // 2 for n in size])
    m_out = np.empty((count, *size), np.float32)
    f_out = np.empty((count, *size), np.float32)
    for i, c in enumerate(centres):
        start = c - half
        m_out[i] = extract_patch(moving, start, size)
        f_out[i] = extract_patch(fixed, start, size)
    return m_out, f_out, centres, foreground


def patch_pair_dataset(images, patch_size=64, patches_per_pair=2, batch_size=16, seed=0,
                       threshold=0.01, shuffle=True, repeat=True):
    """A tf.data pipeline of patch pairs for patch training (paper: 64^3, batches of 16).

    Pairs come from `mdregnet.data.pair_dataset` (all ordered pairs, seeded shuffle per epoch;
    `images` is an `(N, *S)` array or `H5Volumes`), or `images` may already be such a dataset
    of `(moving, fixed)` batches `(B, *S, 1)`. From each pair `sample_patch_pairs` draws
    `patches_per_pair` pairs (default 2: one foreground and one background centre), seeded by
    `(seed, pair index)` so the stream is deterministic; patches are then batched.

    Args:
        images: image stack or a dataset of `(moving, fixed)` batches (see above).
        patch_size: patch size per axis (int).
        patches_per_pair: patches drawn per image pair.
        batch_size: patch pairs per batch (paper: 16).
        seed: seed of the pair order and of the patch centres.
        threshold: foreground threshold (`foreground_mask`).
        shuffle, repeat: passed to `pair_dataset` (ignored for a dataset input).

    Returns:
        `tf.data.Dataset` of `(moving, fixed)`, each float32 `(batch_size, *patch, 1)` with a
        static shape, the format `mdregnet.train` steps take.
    """
    import tensorflow as tf

    from mdregnet import data

    if isinstance(images, tf.data.Dataset):
        pairs = images
    else:
        pairs = data.pair_dataset(images, batch_size=1, seed=seed, shuffle=shuffle, repeat=repeat)
    spec = pairs.element_spec[0]
    ndims = len(spec.shape) - 2
    size = (int(patch_size),) * ndims
    per_pair = int(patches_per_pair)
    base_seed = int(seed)

    def sample(index, moving, fixed):
        ms, fs = [], []
        for b in range(moving.shape[0]):
            m, f, _, _ = sample_patch_pairs(moving[b, ..., 0], fixed[b, ..., 0], size, per_pair,
                                            seed=[base_seed, int(index), b], threshold=threshold)
            ms.append(m)
            fs.append(f)
        return np.concatenate(ms)[..., None], np.concatenate(fs)[..., None]

    def to_patches(index, pair):
        moving, fixed = pair
        m, f = tf.numpy_function(sample, [index, moving, fixed], [tf.float32, tf.float32])
        shape = (-1, *size, 1)
        return tf.reshape(m, shape), tf.reshape(f, shape)

    ds = pairs.enumerate().map(to_patches, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
    ds = ds.unbatch().batch(int(batch_size), drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def tile_starts(shape, patch_size=64, keep=32):
    """Patch starts (in volume coordinates, possibly negative) of the inference tiling.

    Tile `t` (per axis) keeps the voxels `[t*keep, (t+1)*keep)` and is cut from the patch starting
    at `t*keep - m`, `m = (patch_size - keep) / 2`.

    Returns:
        `(starts, n_tiles)`: list of per-axis start tuples, and the number of tiles per axis.
    """
    patch_size, keep = int(patch_size), int(keep)
    if not 1 <= keep <= patch_size or (patch_size - keep) % 2:
        raise ValueError(f"keep must be in 1..patch_size with patch_size - keep even, got "
                         f"patch_size={patch_size}, keep={keep}")
    margin = (patch_size - keep) // 2
    n_tiles = [math.ceil(n / keep) for n in shape]
    starts = [tuple(t * keep - margin for t in tile)
              for tile in itertools.product(*[range(n) for n in n_tiles])]
    return starts, n_tiles


def predict_by_patches(network, moving, fixed, patch_size=64, keep=32, batch_size=4):
    """Runs a patch network over a volume and stitches the central `keep`^d of every patch.

    Args:
        network: callable `network([moving_patches, fixed_patches], training=False)` ->
            `(P, *patch, C)` (e.g. a stage of a patch_fcn model, `patch_fcn.stage_networks`).
        moving, fixed: one image pair, `(*S)`, `(*S, 1)` or `(1, *S, 1)`, 2D or 3D.
        patch_size: patch size per axis (paper 64); keep: kept central size (paper 32).
        batch_size: patches per network call.

    Returns:
        float32 array `(1, *S, C)`: voxel `p` holds the network's output at `p` in the one patch
        whose central cube contains `p` (see the module docstring for the padding).
    """
    import tensorflow as tf

    moving = _spatial(moving, "moving")
    fixed = _spatial(fixed, "fixed")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} must share one grid")
    shape = moving.shape
    ndims = moving.ndim
    starts, n_tiles = tile_starts(shape, patch_size, keep)
    size = (int(patch_size),) * ndims
    margin = (int(patch_size) - int(keep)) // 2
    centre = tuple(slice(margin, margin + int(keep)) for _ in range(ndims))
    out = None
    for first in range(0, len(starts), int(batch_size)):
        chunk = starts[first:first + int(batch_size)]
        m = np.stack([extract_patch(moving, s, size) for s in chunk])[..., None]
        f = np.stack([extract_patch(fixed, s, size) for s in chunk])[..., None]
        pred = network([tf.constant(m), tf.constant(f)], training=False)
        pred = np.asarray(pred, dtype=np.float32)
        if out is None:
            out = np.zeros((*[t * int(keep) for t in n_tiles], pred.shape[-1]), np.float32)
        for s, p in zip(chunk, pred):
            dst = tuple(slice(a + margin, a + margin + int(keep)) for a in s)
            out[dst] = p[centre]
    return out[tuple(slice(0, n) for n in shape)][None]


def register_by_patches(model, moving, fixed, patch_size=None, keep=None, batch_size=4):
    """The paper's patch inference with a patch_fcn model (one pair).

    For each stage j = 1..k of the model (k = its `train_stage`): the stage's FCN is run by
    patches (`predict_by_patches`) on the moving image warped by the composition of the earlier
    stages and on the fixed image; the central `keep`^d velocities are stitched into a
    whole-volume SVF `v_j`, integrated once (`exp(v_j)`, `exp(-v_j)`, the model's `int_steps`) and
    composed with the earlier stages exactly as the model does (`U_j = u_j + U_{j-1} o (id + u_j)`,
    inverse in reverse order).

    Args:
        model: a patch_fcn model from `models.build` / `models.load` (any input size).
        moving, fixed: `(*S)`, `(*S, 1)` or `(1, *S, 1)` images in [0, 1], any size (no
            divisibility needed: the patches carry the padding).
        patch_size, keep: default the model's `patch_size` / `patch_keep` (paper 64 and 32).
        batch_size: patches per network call.

    Returns:
        dict of float32 tensors as the model's outputs: 'warped' `(1, *S, 1)`, 'disp',
        'inverse_disp', 'velocity' (the last stage's stitched SVF) `(1, *S, ndims)`, and per stage
        'velocity_stage{j}', 'disp_stage{j}', 'inverse_disp_stage{j}'.
    """
    import tensorflow as tf

    from mdregnet import layers
    from mdregnet.models import patch_fcn

    config = getattr(model, "mdregnet_config", None)
    if not config or config.get("name") != "patch_fcn":
        raise ValueError("register_by_patches needs a patch_fcn model from mdregnet.models.build "
                         "or mdregnet.models.load")
    hp = config["hparams"]
    patch_size = int(hp["patch_size"] if patch_size is None else patch_size)
    keep = int(hp["patch_keep"] if keep is None else keep)
    moving = _spatial(moving, "moving")
    fixed = _spatial(fixed, "fixed")
    moving_t = tf.constant(moving[None, ..., None])
    out = {}
    current = moving
    disp = inverse = velocity = None
    nets = patch_fcn.stage_networks(model)
    for j, net in enumerate(nets, start=1):
        velocity = tf.constant(predict_by_patches(net, current, fixed, patch_size, keep,
                                                  batch_size))
        u = layers.integrate_svf(velocity, hp["int_steps"])
        u_inv = layers.integrate_svf(-velocity, hp["int_steps"])
        out[f"velocity_stage{j}"], out[f"disp_stage{j}"] = velocity, u
        out[f"inverse_disp_stage{j}"] = u_inv
        if disp is None:
            disp, inverse = u, u_inv
        else:
            disp = layers.compose(u, disp)
            inverse = layers.compose(inverse, u_inv)
        warped = layers.warp(moving_t, disp)
        current = warped.numpy()[0, ..., 0]
    out.update(velocity=velocity, disp=disp, inverse_disp=inverse, warped=warped)
    return out
