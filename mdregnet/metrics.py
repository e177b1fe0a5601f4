"""Evaluation metrics: Dice overlap, Jacobian determinant, folding, SDlogJ, inverse consistency.

Everything here is numpy and usable without a model, except `jacobian_determinant_tf`, the
differentiable TensorFlow twin of `jacobian_determinant` used by `mdregnet.losses`.

Conventions (see CONVENTIONS.md): a displacement field has shape `(*spatial, ndims)` or
`(B, *spatial, ndims)` with `ndims` in {2, 3}; component `c` is the displacement along array axis
`c`, in voxels; the transform is `phi(p) = p + u(p)`. Jacobian determinants are those of `phi`,
`det(I + grad u)`, with derivatives by central differences inside the grid and one-sided
differences at its faces, exactly as `numpy.gradient` (unit spacing, `edge_order=1`).
"""

import itertools

import numpy as np
import tensorflow as tf

__all__ = [
    "dice",
    "jacobian_determinant",
    "jacobian_determinant_tf",
    "folding",
    "sd_log_jacobian",
    "inverse_consistency",
]

# Bounds applied to the determinant before the logarithm in `sd_log_jacobian`.
SDLOGJ_CLIP = (1e-9, 1e9)


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------

def _as_label_array(labels, name):
    """Returns `labels` as an integer numpy array, or raises ValueError for non-integer values."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(
                f"{name} must hold integer labels; got a {arr.dtype} array with non-integer "
                "values (did you warp a label map with linear interpolation?)")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must be an integer label array; got dtype {arr.dtype}")


def dice(fixed_labels, warped_labels, labels=None):
    """Dice overlap per label between a fixed and a warped (moving) label map.

    `Dice(l) = 2 |A_l ∩ B_l| / (|A_l| + |B_l|)` with `A_l = {fixed == l}`, `B_l = {warped == l}`.

    Args:
        fixed_labels: integer array, any shape (e.g. `(X, Y, Z)`), the fixed image's label map.
            Float arrays are accepted only if every value is an integer; bool counts as {0, 1}.
        warped_labels: integer array of the same shape, the moving label map warped onto the fixed
            grid (nearest neighbour).
        labels: iterable of ints to evaluate, used as given (0 included if you list it).
            Default: the unique nonzero labels of `fixed_labels` (background 0 excluded), as
            CONVENTIONS.md prescribes.

    Returns:
        `(per_label, mean)`: `per_label` is a `dict[int, float]` in ascending label order; `mean`
        is the mean over the labels with a defined Dice. A label given explicitly that is absent
        from both maps has an undefined Dice (0/0): it is reported as `nan` and left out of the
        mean. With no labels at all (e.g. an all-background fixed map) returns `({}, nan)`.

    Raises:
        ValueError: the shapes differ (the message names both), or a map is not integer-valued.
    """
    fixed = _as_label_array(fixed_labels, "fixed_labels")
    warped = _as_label_array(warped_labels, "warped_labels")
    if fixed.shape != warped.shape:
        raise ValueError(
            f"fixed_labels shape {fixed.shape} and warped_labels shape {warped.shape} differ")

    if labels is None:
        wanted = [int(v) for v in np.unique(fixed) if v != 0]
    else:
        wanted = sorted({int(v) for v in np.asarray(labels).ravel()})

    # One sort per map instead of one boolean pass per label (134 labels on MALC).
    def counts(values):
        keys, n = np.unique(values, return_counts=True)
        return dict(zip(keys.tolist(), n.tolist()))

    size_fixed = counts(fixed)
    size_warped = counts(warped)
    size_both = counts(fixed[fixed == warped])

    per_label = {}
    for label in wanted:
        total = size_fixed.get(label, 0) + size_warped.get(label, 0)
        per_label[label] = (2.0 * size_both.get(label, 0) / total) if total else float("nan")
    defined = [v for v in per_label.values() if not np.isnan(v)]
    mean = float(np.mean(defined)) if defined else float("nan")
    return per_label, mean


# --------------------------------------------------------------------------------------------
# Jacobian determinant
# --------------------------------------------------------------------------------------------

def _batched_field(disp, name="disp"):
    """Returns `(field (B, *spatial, ndims) float64, batched: bool, ndims)` or raises."""
    field = np.asarray(disp, dtype=np.float64)
    if field.ndim < 3:
        raise ValueError(f"{name} must be (*spatial, ndims) or (B, *spatial, ndims); "
                         f"got shape {field.shape}")
    ndims = field.shape[-1]
    if ndims not in (2, 3):
        raise ValueError(f"{name} must have 2 or 3 components on its last axis; "
                         f"got shape {field.shape}")
    if field.ndim == ndims + 1:
        return field[np.newaxis], False, ndims
    if field.ndim == ndims + 2:
        return field, True, ndims
    raise ValueError(f"{name} with {ndims} components must have rank {ndims + 1} (unbatched) or "
                     f"{ndims + 2} (batched); got shape {field.shape}")


def _det(jac, ndims):
    """Determinant of a nested list `jac[c][a]` of equally shaped arrays or tensors."""
    if ndims == 2:
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    return (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
            - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
            + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))


def jacobian_determinant(disp):
    """Jacobian determinant of `phi(p) = p + u(p)` on the voxel grid (numpy).

    `det(I + grad u)` with `(grad u)[c, a] = d u_c / d x_a` by `numpy.gradient` along each
    spatial axis `a` (unit spacing: central differences inside, one-sided first-order differences
    at the faces). Values are dimensionless (displacements and coordinates are both in voxels).

    Args:
        disp: displacement field, `(*spatial, ndims)` or `(B, *spatial, ndims)`, `ndims` in
            {2, 3}, in voxels, any real dtype (computed in float64).

    Returns:
        float64 array `spatial` or `(B, *spatial)` (same batching as the input).

    Raises:
        ValueError: bad rank / number of components, or a spatial axis shorter than 2 voxels.
    """
    field, batched, ndims = _batched_field(disp)
    spatial = field.shape[1:-1]
    if min(spatial) < 2:
        raise ValueError(f"every spatial axis needs at least 2 voxels; got shape {field.shape}")
    jac = [[np.gradient(field[..., c], axis=1 + a) + (1.0 if a == c else 0.0)
            for a in range(ndims)] for c in range(ndims)]
    det = _det(jac, ndims)
    return det if batched else det[0]


def _gradient_tf(x, axis):
    """`numpy.gradient(x, axis=axis)` (unit spacing, edge_order=1) for a TF tensor."""
    def part(start, stop):
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    first = part(1, 2) - part(0, 1)
    inner = (part(2, None) - part(None, -2)) * 0.5
    last = part(-1, None) - part(-2, -1)
    return tf.concat([first, inner, last], axis=axis)


def jacobian_determinant_tf(disp):
    """Differentiable TensorFlow Jacobian determinant of `phi(p) = p + u(p)`.

    Same definition and finite differences as `jacobian_determinant` (central inside, one-sided
    at the faces, as `numpy.gradient`); the two agree to float32 round-off.

    Args:
        disp: tensor `(B, *spatial, ndims)`, `ndims` in {2, 3}, in voxels; any float dtype
            (computed in float32). Every spatial axis needs at least 2 voxels.

    Returns:
        float32 tensor `(B, *spatial)`.

    Raises:
        ValueError: the rank is not `ndims + 2` or `ndims` is not 2 or 3 (static shapes).
    """
    disp = tf.cast(tf.convert_to_tensor(disp), tf.float32)
    ndims = disp.shape[-1]
    if ndims not in (2, 3) or len(disp.shape) != ndims + 2:
        raise ValueError(f"disp must be (B, *spatial, ndims) with ndims in {{2, 3}}; "
                         f"got shape {disp.shape}")
    jac = [[_gradient_tf(disp[..., c], axis=1 + a) + (1.0 if a == c else 0.0)
            for a in range(ndims)] for c in range(ndims)]
    return _det(jac, ndims)


# --------------------------------------------------------------------------------------------
# Folding and SDlogJ
# --------------------------------------------------------------------------------------------

def _mask_for(mask, det_shape, batched):
    """Broadcasts a spatial (or full) mask to `det_shape`; returns a bool array or raises."""
    mask = np.asarray(mask) != 0
    spatial = det_shape[1:] if batched else det_shape
    if mask.shape == tuple(det_shape):
        return mask
    if mask.shape == tuple(spatial):
        return np.broadcast_to(mask, det_shape)
    raise ValueError(f"mask shape {mask.shape} matches neither the spatial shape {tuple(spatial)} "
                     f"nor the determinant shape {tuple(det_shape)}")


def folding(disp, mask=None):
    """Counts folded voxels, i.e. voxels where `det(I + grad u) <= 0`.

    Args:
        disp: displacement field `(*spatial, ndims)` or `(B, *spatial, ndims)`, in voxels.
            A batch is pooled: counts and percentages are over all its voxels.
        mask: optional array, the spatial shape (applied to every batch item) or the full
            `(B, *spatial)` shape; nonzero = inside (e.g. the fixed image's brain mask).

    Returns:
        dict with `count` (int) and `percent` (float, 0-100, over the whole grid); with a mask also
        `count_in_mask` and `percent_in_mask` (over the mask's voxels).

    Raises:
        ValueError: bad field shape, a mask of another shape, or an empty mask.
    """
    det = jacobian_determinant(disp)
    folded = det <= 0
    out = {"count": int(folded.sum()), "percent": 100.0 * float(folded.mean())}
    if mask is not None:
        _, batched, _ = _batched_field(disp)
        inside = _mask_for(mask, det.shape, batched)
        n_inside = int(inside.sum())
        if n_inside == 0:
            raise ValueError("mask is empty")
        count = int((folded & inside).sum())
        out["count_in_mask"] = count
        out["percent_in_mask"] = 100.0 * count / n_inside
    return out


def sd_log_jacobian(disp, mask=None, shift=0.0):
    """Standard deviation of the log Jacobian determinant (SDlogJ, as reported by Learn2Reg).

    `std(log(clip(det + shift, 1e-9, 1e9)))` over the voxels (in the mask). The clipping keeps
    folded voxels (det <= 0) finite: each contributes log(1e-9) ~ -20.7, so folding shows up as a
    large SDlogJ instead of NaN. `shift=0` is the plain definition used by mdregnet. The Learn2Reg
    evaluation scripts add 3 before clipping (`shift=3`), which compresses the values roughly
    4-fold near det = 1; pass `shift=3.0` only to compare with numbers computed that way.

    Args:
        disp: displacement field `(*spatial, ndims)` or `(B, *spatial, ndims)`, in voxels.
            A batch is pooled into one standard deviation; call per item for per-pair values.
        mask: optional mask, spatial or `(B, *spatial)` shape, nonzero = inside.
        shift: float added to the determinant before clipping (see above).

    Returns:
        float, the population standard deviation (ddof=0), dimensionless.

    Raises:
        ValueError: bad field shape, a mask of another shape, or an empty mask.
    """
    det = jacobian_determinant(disp)
    log_det = np.log(np.clip(det + shift, *SDLOGJ_CLIP))
    if mask is not None:
        _, batched, _ = _batched_field(disp)
        inside = _mask_for(mask, det.shape, batched)
        if not inside.any():
            raise ValueError("mask is empty")
        log_det = log_det[inside]
    return float(np.std(log_det))


# --------------------------------------------------------------------------------------------
# Inverse consistency
# --------------------------------------------------------------------------------------------

def _sample_linear(field, coords):
    """Samples `field (*spatial, C)` at voxel coordinates `coords (..., ndims)`.

    Bi/trilinear interpolation; coordinates are clamped to the grid (border replicate).
    Returns `(..., C)` float64.
    """
    spatial = field.shape[:-1]
    ndims = len(spatial)
    lower, weight = [], []
    for a in range(ndims):
        size = spatial[a]
        c = np.clip(coords[..., a], 0.0, size - 1)
        i0 = np.minimum(np.floor(c).astype(np.int64), max(size - 2, 0))
        lower.append(i0)
        weight.append(c - i0)
    out = 0.0
    for corner in itertools.product((0, 1), repeat=ndims):
        index, w = [], 1.0
        for a, bit in enumerate(corner):
            index.append(np.minimum(lower[a] + bit, spatial[a] - 1))
            w = w * (weight[a] if bit else 1.0 - weight[a])
        out = out + w[..., np.newaxis] * field[tuple(index)]
    return out


def inverse_consistency(disp, inverse_disp, mask=None):
    """Inverse-consistency error of a forward field and its claimed inverse.

    The composition `phi_inv o phi` (CONVENTIONS.md: `u = u1 + warp(u2, u1)`) should be the
    identity; its residual displacement is `r(p) = u(p) + u_inv(p + u(p))`, with `u_inv` sampled
    bi/trilinearly at `p + u(p)` and coordinates clamped to the grid (border replicate). Reports
    the Euclidean norm `|r(p)|` in voxels.

    Args:
        disp: forward displacement `u`, `(*spatial, ndims)` or `(B, *spatial, ndims)`, voxels.
        inverse_disp: the inverse displacement `u_inv`, same shape (e.g. from `exp(-v)`).
        mask: optional mask, spatial or `(B, *spatial)` shape, nonzero = voxels `p` to include.
            Voxels whose `p + u(p)` leaves the grid see the replicated border of `u_inv`; mask
            them out to measure the interior only.

    Returns:
        dict `{"mean": float, "max": float}` of `|r(p)|` in voxels (over the batch and mask).

    Raises:
        ValueError: bad or mismatched shapes, a mask of another shape, or an empty mask.
    """
    fwd, batched, _ = _batched_field(disp, "disp")
    inv, _, _ = _batched_field(inverse_disp, "inverse_disp")
    if fwd.shape != inv.shape:
        raise ValueError(f"disp shape {np.shape(disp)} and inverse_disp shape "
                         f"{np.shape(inverse_disp)} differ")
    spatial = fwd.shape[1:-1]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial],
                                indexing="ij"), axis=-1)
    norms = np.empty(fwd.shape[:-1])
    for b in range(fwd.shape[0]):
        residual = fwd[b] + _sample_linear(inv[b], grid + fwd[b])
        norms[b] = np.sqrt(np.sum(residual ** 2, axis=-1))
    if mask is not None:
        inside = _mask_for(mask, norms.shape if batched else norms.shape[1:], batched)
        if not batched:
            inside = inside[np.newaxis]
        if not inside.any():
            raise ValueError("mask is empty")
        norms = norms[inside]
    return {"mean": float(np.mean(norms)), "max": float(np.max(norms))}
