"""Similarity and regularisation terms of the MDReg-Net objective (TensorFlow ops only).

MDReg-Net (Methods, multi-resolution registration) minimises, summed over resolution levels l,

    -S(I_f^l, I_m^l o Phi(v~^l)) - S(I_m^l, I_f^l o Phi^-(v~^l)) + lambda * R(v^l)

with S the normalised cross-correlation and R(v) = sum_n ||grad v_n||_1 (total variation).
This module provides the pieces: `NCC` (the loss -S), `MSE`, `Grad` (R), `bidirectional` (the
forward + inverse similarity pair), and `JacobianPenalty` (a folding penalty, not in MDReg-Net,
after the Jacobian constraint of the variational Jacobian learning paper).

Every loss is a small callable `loss(y_true, y_pred) -> scalar float32 tensor` with
`get_config`/`from_config`, registered as Keras-serialisable under the package "mdregnet", so it
can be given to `model.compile(loss=...)` directly. Inputs of any float dtype (float16, bfloat16
under mixed precision) are cast to float32 first. Losses are means over the batch; per-sample
weights are not supported.

Shapes: images `(B, *spatial, C)` channels last; displacement / velocity fields
`(B, *spatial, ndims)` in voxels, component c along array axis c; `ndims = rank - 2` in {2, 3}.
"""

import keras
import numpy as np
import tensorflow as tf

from mdregnet.metrics import jacobian_determinant_tf

__all__ = ["NCC", "MSE", "Grad", "OperatorNorm", "JacobianPenalty", "bidirectional", "get"]


def _float32(x):
    """Converts to a float32 tensor (losses are always computed in float32)."""
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def _spatial_ndims(x, name):
    """Returns `ndims = rank - 2` for a `(B, *spatial, C)` tensor, or raises ValueError."""
    rank = len(x.shape)
    if rank not in (4, 5):
        raise ValueError(f"{name} must be (B, *spatial, C) with 2 or 3 spatial axes; "
                         f"got shape {x.shape}")
    return rank - 2


class _Serializable:
    """`from_config` shared by the loss classes (their config is their constructor kwargs)."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="mdregnet")
class NCC(_Serializable):
    """Local (windowed) squared normalised cross-correlation loss, as in VoxelMorph.

    The MDReg-Net paper names its similarity "normalized cross-correlation (NCC)" without further
    detail; the public implementations it builds on (VoxelMorph and its descendants) use the squared local NCC below, so this is what mdregnet implements. For
    each voxel p, with windowed sums `S[.]` over a box of `n` voxels centred on p (for an even
    size the extra voxel lies after p, as TF 'SAME' padding places it):

        cross = S[IJ] - uJ S[I] - uI S[J] + uI uJ n,     uI = S[I] / n,  uJ = S[J] / n
        var_I = S[I^2] - 2 uI S[I] + uI^2 n              (var_J likewise)
        cc(p) = cross^2 / (var_I var_J + eps)

    and the loss is `-mean_p cc(p)`, in [-1, 0]: identical textured images give about -1,
    unrelated or flat images about 0. Windowed sums are box filters with 'SAME' zero padding
    (computed separably, one 1D pass per axis, which equals VoxelMorph's ones-kernel convolution).
    The sums are taken of the images minus their global means and the statistics above restored
    exactly from them (see the code), which is the same function as VoxelMorph's but free of its
    float32 cancellation: flat regions give cc ~ 0 rather than round-off noise.

    Boundary handling (`boundary`):
      * "zeros" (default, VoxelMorph): voxels outside the volume count as intensity 0 and
        `n = prod(window) * C` everywhere. The zero image gives exactly 0. A nonzero image that
        is flat inside the volume is NOT flat in border windows (it meets the zero padding), so
        two constant nonzero images give a negative loss there; brain volumes with a zero
        background are unaffected.
      * "inside": statistics over the in-volume part of each window only (`n(p)` = number of
        in-volume voxels times C), i.e. the true local NCC at borders; equal to "zeros" at
        interior voxels. Any constant image gives 0 up to round-off.
    Variances are clamped at 0 before the product, so the denominator is at least `eps`: the
    value and its gradient are finite for every input, flat images included.

    Channels: like VoxelMorph, a multi-channel image is pooled into one statistic per voxel (the
    window sums also run over the C channels, `n` includes the factor C).

    Args:
        window: int or tuple of ints (one per spatial axis, array-axis order), window size in
            voxels. Default 9 (VoxelMorph's 9^ndims).
        eps: float > 0 added to the denominator.
        boundary: "zeros" or "inside" (see above).
        name: str, the loss name.

    Call arguments:
        y_true: fixed image `(B, *spatial, C)`, any float dtype.
        y_pred: warped moving image, same shape.

    Returns:
        Scalar float32 tensor, `-mean(cc)` over batch and voxels.

    Raises:
        ValueError: bad window / eps / boundary at construction; at call time a rank other than
            4 or 5, a window tuple of the wrong length, or mismatched channel counts.

    References:
        Balakrishnan et al., VoxelMorph, IEEE TMI 2019 (local NCC, window 9).
        MDReg-Net, Methods: S is NCC in the bidirectional multi-resolution objective.
    """

    BOUNDARIES = ("zeros", "inside")

    def __init__(self, window=9, eps=1e-5, boundary="zeros", name="ncc"):
        if isinstance(window, (int, np.integer)):
            window = int(window)
            sizes = (window,)
        else:
            window = tuple(int(w) for w in window)
            sizes = window
            if len(window) not in (2, 3):
                raise ValueError(f"window tuple must have 2 or 3 entries; got {window}")
        if min(sizes) < 1:
            raise ValueError(f"window sizes must be positive; got {window}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        if boundary not in self.BOUNDARIES:
            raise ValueError(f"boundary must be one of {self.BOUNDARIES}; got {boundary!r}")
        self.window = window
        self.eps = float(eps)
        self.boundary = boundary
        self.name = name

    def _window_for(self, ndims):
        if isinstance(self.window, int):
            return (self.window,) * ndims
        if len(self.window) != ndims:
            raise ValueError(f"window {self.window} has {len(self.window)} entries for "
                             f"{ndims}-D images")
        return self.window

    @staticmethod
    def _window_sum(x, window):
        """Box sums of `x (N, *spatial, 1)` with 'SAME' zero padding, one axis at a time."""
        ndims = len(window)
        for axis, size in enumerate(window):
            if size == 1:
                continue
            shape = [1] * ndims
            shape[axis] = size
            kernel = tf.ones(shape + [1, 1], tf.float32)
            # conv2d/conv3d with an explicit data_format: the eager gradient of
            # tf.nn.convolution's 3D path fails on a missing data_format attribute (TF 2.21).
            if ndims == 2:
                x = tf.nn.conv2d(x, kernel, strides=1, padding="SAME", data_format="NHWC")
            else:
                x = tf.nn.conv3d(x, kernel, strides=[1] * 5, padding="SAME",
                                 data_format="NDHWC")
        return x

    @staticmethod
    def _window_count(x, window):
        """In-volume voxels per 'SAME' window, broadcastable `(1, *spatial, 1)` float32."""
        ndims = len(window)
        count = tf.ones([1] * (ndims + 2), tf.float32)
        for axis, size in enumerate(window):
            length = tf.shape(x)[axis + 1]
            index = tf.range(length)
            low = tf.maximum(index - (size - 1) // 2, 0)      # TF 'SAME': (k-1)//2 before,
            high = tf.minimum(index + size // 2, length - 1)  # k//2 after
            shape = [1] * (ndims + 2)
            shape[axis + 1] = -1
            count = count * tf.reshape(tf.cast(high - low + 1, tf.float32), shape)
        return count

    def local_cc(self, y_true, y_pred):
        """The per-voxel squared local NCC map `cc(p)` in [0, 1].

        Args:
            y_true: fixed image `(B, *spatial, C)`.
            y_pred: warped moving image, same shape.

        Returns:
            float32 tensor `(B, *spatial, 1)`.
        """
        fixed = _float32(y_true)
        warped = _float32(y_pred)
        ndims = _spatial_ndims(fixed, "y_true")
        if len(warped.shape) != ndims + 2:
            raise ValueError(f"y_true shape {fixed.shape} and y_pred shape {warped.shape} "
                             "have different ranks")
        channels = fixed.shape[-1]
        if channels is not None and warped.shape[-1] is not None and channels != warped.shape[-1]:
            raise ValueError(f"y_true shape {fixed.shape} and y_pred shape {warped.shape} "
                             "have different channel counts")
        window = self._window_for(ndims)
        if channels is None:
            channels = tf.cast(tf.shape(fixed)[-1], tf.float32)

        # Centre each image on its global mean m (per sample), then restore the exact
        # statistics of the uncentred images algebraically. With c(p) in-volume values of the
        # window and n = prod(window) * C (zero padding fills the rest):
        #   var  = S[x'^2] - S[x']^2/n + (2 m S[x'] + m^2 c) (1 - c/n)
        #   cross = S[x'y'] - S[x']S[y']/n + (m_y S[x'] + m_x S[y'] + m_x m_y c) (1 - c/n)
        # which equals VoxelMorph's S[xy] - uy S[x] - ux S[y] + ux uy n without its float32
        # cancellation (a flat interior gives ~0, not round-off noise that can exceed 1).
        # "inside" takes n = c(p), so the correction terms vanish.
        axes = list(range(1, ndims + 2))
        m_i = tf.reduce_mean(fixed, axis=axes, keepdims=True)
        m_j = tf.reduce_mean(warped, axis=axes, keepdims=True)
        fixed = fixed - m_i
        warped = warped - m_j
        count = self._window_count(fixed, window) * channels

        def pooled(t):
            return tf.reduce_sum(t, axis=-1, keepdims=True)

        # One batched pass of the box filter over the five statistics.
        stats = tf.concat([pooled(fixed), pooled(warped), pooled(fixed * fixed),
                           pooled(warped * warped), pooled(fixed * warped)], axis=0)
        sums = self._window_sum(stats, window)
        i_sum, j_sum, i2_sum, j2_sum, ij_sum = tf.split(sums, 5, axis=0)

        n = count if self.boundary == "inside" else float(np.prod(window)) * channels
        cross = ij_sum - i_sum * j_sum / n
        var_i = i2_sum - i_sum * i_sum / n
        var_j = j2_sum - j_sum * j_sum / n
        if self.boundary == "zeros":
            outside = 1.0 - count / n  # share of the window in the zero padding; 0 inside
            cross += (m_j * i_sum + m_i * j_sum + m_i * m_j * count) * outside
            var_i += (2.0 * m_i * i_sum + m_i * m_i * count) * outside
            var_j += (2.0 * m_j * j_sum + m_j * m_j * count) * outside
        var_i = tf.maximum(var_i, 0.0)
        var_j = tf.maximum(var_j, 0.0)
        return cross * cross / (var_i * var_j + self.eps)

    def __call__(self, y_true, y_pred):
        return -tf.reduce_mean(self.local_cc(y_true, y_pred))

    def get_config(self):
        window = self.window if isinstance(self.window, int) else list(self.window)
        return {"window": window, "eps": self.eps, "boundary": self.boundary,
                "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class MSE(_Serializable):
    """Mean squared intensity difference.

    Args:
        name: str, the loss name.

    Call arguments:
        y_true: fixed image `(B, *spatial, C)`, any float dtype.
        y_pred: warped moving image, same shape (or broadcastable).

    Returns:
        Scalar float32 tensor, `mean((y_true - y_pred)^2)` in squared intensity units.

    References:
        MDReg-Net, Methods: mean squared difference as the usual mono-modal alternative to NCC.
    """

    def __init__(self, name="mse"):
        self.name = name

    def __call__(self, y_true, y_pred):
        return tf.reduce_mean(tf.square(_float32(y_true) - _float32(y_pred)))

    def get_config(self):
        return {"name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class Grad(_Serializable):
    """Gradient regulariser of a displacement or velocity field (forward differences).

    For each spatial axis a, `d_a u = u[x + e_a] - u[x]` (all components, `L_a - 1` positions
    along a); the loss is the average over axes of the mean over batch, positions and components
    of `|d_a u|` ("l1") or `(d_a u)^2` ("l2"):

        Grad = (1/ndims) sum_a mean(|d_a u|)        (l1)

    "l1" is MDReg-Net's total-variation regulariser `R(v) = sum_n ||grad v_n||_1`, but averaged
    instead of summed: R / (N ndims^2) up to the border positions. That is VoxelMorph's
    convention, and it is what makes the paper's lambda in [0.1, 1] meaningful (with the sum over
    ~7e6 voxels that lambda would swamp NCC, whose value lies in [-1, 0]).

    Units and levels: the gradient of a displacement is dimensionless (voxels per voxel), so a
    field at a coarser level, expressed in that level's voxels, needs no scale factor: a field of D
    fine voxels varying over L fine voxels has gradient D/L at every level (at a level s times
    coarser it spans D/s coarse voxels over L/s coarse voxels). The same lambda therefore applies
    at every level; `loss_mult` exists only for explicit weighting (VoxelMorph compatibility).

    Args:
        penalty: "l1" (total variation, the paper's R) or "l2" (squared gradient).
        loss_mult: optional float multiplying the result.
        name: str, the loss name.

    Call arguments:
        y_true: ignored (Keras passes a target; VoxelMorph convention).
        y_pred: field `(B, *spatial, ndims)` in voxels, any float dtype.

    Returns:
        Scalar float32 tensor (dimensionless for "l1"; squared for "l2").

    Raises:
        ValueError: an unknown penalty, or a field whose rank is not 4 or 5.

    References:
        MDReg-Net, Methods: R(v) = sum_n ||grad v_n||_1 in the multi-resolution objective.
        Balakrishnan et al., VoxelMorph, IEEE TMI 2019 (`Grad` loss, mean convention).
    """

    PENALTIES = ("l1", "l2")

    def __init__(self, penalty="l1", loss_mult=None, name="grad"):
        if penalty not in self.PENALTIES:
            raise ValueError(f"penalty must be one of {self.PENALTIES}; got {penalty!r}")
        self.penalty = penalty
        self.loss_mult = None if loss_mult is None else float(loss_mult)
        self.name = name

    def __call__(self, y_true, y_pred):
        del y_true  # a regulariser of the prediction alone
        field = _float32(y_pred)
        ndims = _spatial_ndims(field, "y_pred")
        terms = []
        for axis in range(1, ndims + 1):
            ahead = [slice(None)] * (ndims + 2)
            behind = [slice(None)] * (ndims + 2)
            ahead[axis] = slice(1, None)
            behind[axis] = slice(None, -1)
            diff = field[tuple(ahead)] - field[tuple(behind)]
            terms.append(tf.reduce_mean(tf.abs(diff) if self.penalty == "l1" else diff * diff))
        value = tf.add_n(terms) / float(ndims)
        if self.loss_mult is not None:
            value = value * self.loss_mult
        return value

    def get_config(self):
        return {"penalty": self.penalty, "loss_mult": self.loss_mult, "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class OperatorNorm(_Serializable):
    """Squared norm of a differential operator applied to a velocity field: `||L v||^2`.

    `L = -alpha * Laplacian + Id`, the operator of LDDMM (Beg et al. 2005) that the patch-based
    diffeomorphic FCN embeds in its loss (eq. 3). The Laplacian is the 3-point stencil per axis
    (7-point in 3D), component by component, divided by `spacing**2`:

        (L v)_c(p) = v_c(p) - alpha / h^2 * sum_a [v_c(p + e_a) - 2 v_c(p) + v_c(p - e_a)]

    with the faces reflected (`v(-1) = v(0)`, `tf.pad` 'SYMMETRIC': zero normal derivative half a
    voxel outside, the Neumann Laplacian that the DCT-II diagonalises; so the cosines
    `cos(pi k (i + 1/2) / n)` are exact eigenfunctions, eigenvalue `-(2 - 2 cos(pi k / n)) / h^2`).
    The loss is the mean over batch and voxels of the squared Euclidean norm `sum_c (L v)_c^2`,
    i.e. the integral `||L v||^2_{L^2}` per unit volume (the mean, like `Grad`, so the weight does
    not depend on the field's size).

    Time sum of eq. 3: the paper writes `sum_{j=1}^{N} ||L v^t||^2 dt`, N the number of
    integration steps and `dt = 1/N`. For a STATIONARY velocity field (the paper's v_i, integrated
    here by scaling and squaring) every term of that sum is the same, so it equals `||L v||^2`
    exactly (`N * dt = 1`): no step count enters.

    Units: `v` in voxels of its grid; `alpha` in (units of `spacing`)^2. With `spacing = 1` (the
    default) alpha is in voxels^2, which for the paper's 1 mm images is mm^2. Note how weak the
    Laplacian is for small alpha in these units: the highest grid frequency multiplies it by
    `4 * ndims / h^2` (12 in 3D), so alpha = 0.01 changes `L` by at most 12%.

    Args:
        alpha: float >= 0, the smoothness weight of the Laplacian (paper: > 0; 0.01, 0.005, 0.001
            in its three cascade stages).
        spacing: float > 0, the grid spacing `h` in the unit alpha is expressed in.
        name: str, the loss name.

    Call arguments:
        y_true: ignored.
        y_pred: field `(B, *spatial, ndims)` in voxels, any float dtype; `ndims` 2 or 3.

    Returns:
        Scalar float32 tensor >= 0, in squared field units.

    Raises:
        ValueError: alpha < 0, spacing <= 0, or a field whose rank is not 4 or 5.

    References:
        Wu, Zhou, Lin, Wang & Tan, "Fast diffeomorphic image registration using patch based fully
        convolutional networks" (`../shared/papers/patch-based-diffeomorphic-fcn.md`), Sec. II-B,
        eq. 3; Beg, Miller, Trouve & Younes, IJCV 2005 (L = -alpha Laplacian + gamma Id).
    """

    def __init__(self, alpha=0.01, spacing=1.0, name="operator"):
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0; got {alpha}")
        if not spacing > 0:
            raise ValueError(f"spacing must be > 0; got {spacing}")
        self.alpha = float(alpha)
        self.spacing = float(spacing)
        self.name = name

    def apply(self, field):
        """`L v` for a field `(B, *spatial, C)` (any C; each channel alone), float32."""
        field = _float32(field)
        ndims = _spatial_ndims(field, "field")
        laplacian = None
        for axis in range(1, ndims + 1):
            pad = [[0, 0]] * (ndims + 2)
            pad[axis] = [1, 1]
            padded = tf.pad(field, pad, mode="SYMMETRIC")
            ahead = [slice(None)] * (ndims + 2)
            behind = [slice(None)] * (ndims + 2)
            ahead[axis] = slice(2, None)
            behind[axis] = slice(None, -2)
            term = padded[tuple(ahead)] + padded[tuple(behind)] - 2.0 * field
            laplacian = term if laplacian is None else laplacian + term
        return field - (self.alpha / self.spacing ** 2) * laplacian

    def __call__(self, y_true, y_pred):
        del y_true  # a regulariser of the prediction alone
        lv = self.apply(y_pred)
        return tf.reduce_mean(tf.reduce_sum(lv * lv, axis=-1))

    def get_config(self):
        return {"alpha": self.alpha, "spacing": self.spacing, "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class JacobianPenalty(_Serializable):
    """Hinge penalty on non-positive Jacobian determinants of `phi = id + u` (anti-folding).

    `mean(relu(eps - det(I + grad u)))`, with the determinant from `jacobian_determinant_tf`
    (central differences inside, one-sided at the faces). With `eps = 0` only folded voxels
    (det < 0) are penalised, linearly in how negative det is; `eps > 0` also pushes det above eps.
    Not part of MDReg-Net (which relies on the SVF and a smoothing layer); offered for ablations.

    Args:
        eps: float >= 0, the margin below which det is penalised (dimensionless).
        name: str, the loss name.

    Call arguments:
        y_true: ignored.
        y_pred: displacement field `(B, *spatial, ndims)` in voxels, any float dtype; every
            spatial axis at least 2 voxels.

    Returns:
        Scalar float32 tensor, >= 0.

    Raises:
        ValueError: eps < 0, or a field of the wrong rank / component count.

    References:
        Theljani & Chen, variational Jacobian learning: a constraint on the determinant of the
        transformation in the training loss to obtain fold-free maps (this hinge is a simple
        member of that family, not their exact term).
    """

    def __init__(self, eps=0.0, name="jacobian"):
        if eps < 0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        self.eps = float(eps)
        self.name = name

    def __call__(self, y_true, y_pred):
        del y_true
        det = jacobian_determinant_tf(y_pred)
        return tf.reduce_mean(tf.nn.relu(self.eps - det))

    def get_config(self):
        return {"eps": self.eps, "name": self.name}


def bidirectional(similarity, fixed, moving, warped_moving, warped_fixed):
    """Forward plus inverse similarity loss of a diffeomorphic pair.

    `similarity(fixed, warped_moving) + similarity(moving, warped_fixed)`: the forward term
    compares the fixed image with the moving image warped by `Phi(v)`, the inverse term the
    moving image with the fixed image warped by `Phi^-(v) = exp(-v)`.

    Args:
        similarity: callable `(y_true, y_pred) -> scalar`, a loss to minimise (e.g. `NCC()`).
        fixed: fixed image `(B, *spatial, C)`.
        moving: moving image `(B, *spatial, C)`.
        warped_moving: moving image warped onto the fixed grid, same shape.
        warped_fixed: fixed image warped onto the moving grid, same shape.

    Returns:
        Scalar tensor, the sum of the two terms.

    References:
        MDReg-Net, Methods: the bidirectional multi-resolution objective
        `-S(I_f, I_m o Phi(v~)) - S(I_m, I_f o Phi^-(v~)) + lambda R(v)` (the third objective
        of Methods; this function is its two similarity terms at one level).
    """
    return similarity(fixed, warped_moving) + similarity(moving, warped_fixed)


def pair_similarity(similarity, fixed, moving, warped_moving, warped_fixed=None):
    """The similarity loss of a pair: `bidirectional` when `warped_fixed` is given, else the
    forward term `similarity(fixed, warped_moving)` alone.

    Args:
        similarity: callable `(y_true, y_pred) -> scalar`, a loss to minimise (e.g. `NCC()`).
        fixed, moving, warped_moving: `(B, *spatial, C)` images (see `bidirectional`).
        warped_fixed: the fixed image warped onto the moving grid by the inverse transform, or
            None for a one-directional loss.

    Returns:
        Scalar tensor.

    References:
        MDReg-Net, Methods (the bidirectional objective); VoxelMorph (Dalca et al. 2019) for the
        forward-only form.
    """
    if warped_fixed is None:
        return similarity(fixed, warped_moving)
    return bidirectional(similarity, fixed=fixed, moving=moving, warped_moving=warped_moving,
                         warped_fixed=warped_fixed)


_LOSSES = {"ncc": NCC, "mse": MSE, "grad": Grad, "operator": OperatorNorm,
           "jacobian": JacobianPenalty}


def get(name, **kwargs):
    """Builds a loss by name.

    Args:
        name: one of "ncc", "mse", "grad", "operator", "jacobian" (case-insensitive).
        **kwargs: constructor arguments of that class.

    Returns:
        The loss instance.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = str(name).lower()
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(_LOSSES)}")
    return _LOSSES[key](**kwargs)


# ------------------------------------------------------------------------------------------------
# Variational Jacobian learning (Theljani & Chen, ../shared/papers/variational-jacobian-learning.md)
#
# The stored text of that paper keeps its prose but not its displayed formulas: it names the
# ingredients (first- and second-order smoothing, a constraint on det of the transformation, a
# correlation-type mono-modal measure, parallel level sets for multi-modal images, lambda = 60 in
# the loss (2)) without their exact expressions. The terms below are the standard members of each
# family named there; each docstring says which sentence it rests on and what had to be chosen.
# ------------------------------------------------------------------------------------------------
def _image_gradient(image):
    """Central-difference gradient of every channel (one-sided at the faces, `numpy.gradient`).

    Args:
        image: `(B, *spatial, C)` float32 tensor, every spatial axis at least 2 voxels.

    Returns:
        list of `ndims` tensors `(B, *spatial, C)`, the derivative along array axis a, in
        intensity units per voxel.
    """
    from mdregnet.metrics import _gradient_tf  # the numpy.gradient twin the Jacobian uses

    ndims = len(image.shape) - 2
    return [_gradient_tf(image, axis=1 + a) for a in range(ndims)]


def _gradient_products(y_true, y_pred, eps2):
    """`(|grad f|^2 + eps2, |grad w|^2 + eps2, <grad f, grad w>)` of fixed `y_true` and warped
    `y_pred` (central differences, `_image_gradient`), each `(B, *spatial, C)` float32."""
    fixed, warped, _ = _check_pair(y_true, y_pred)
    grad_f = _image_gradient(fixed)
    grad_w = _image_gradient(warped)
    norm_f = tf.add_n([g * g for g in grad_f]) + eps2
    norm_w = tf.add_n([g * g for g in grad_w]) + eps2
    dot = tf.add_n([f * w for f, w in zip(grad_f, grad_w)])
    return norm_f, norm_w, dot


def _check_pair(y_true, y_pred):
    """float32 `(fixed, warped)` of equal rank and channel count; returns them and ndims."""
    fixed = _float32(y_true)
    warped = _float32(y_pred)
    ndims = _spatial_ndims(fixed, "y_true")
    if len(warped.shape) != ndims + 2:
        raise ValueError(f"y_true shape {fixed.shape} and y_pred shape {warped.shape} have "
                         "different ranks")
    if None not in (fixed.shape[-1], warped.shape[-1]) and fixed.shape[-1] != warped.shape[-1]:
        raise ValueError(f"y_true shape {fixed.shape} and y_pred shape {warped.shape} have "
                         "different channel counts")
    return fixed, warped, ndims


@keras.saving.register_keras_serializable(package="mdregnet")
class GlobalCC(_Serializable):
    """Squared global correlation-coefficient loss `1 - rho^2`, the mono-modal similarity.

    Per batch item, over all voxels and channels of the pair,

        rho^2 = cov(T, R)^2 / (var(T) var(R) + eps),      loss = mean_b (1 - rho_b^2),

    with population (co)variances. The loss lies in [0, 1] and is 0 exactly when the warped
    image is an affine function `a R + b` of the fixed one (a != 0; sign included), so it measures
    linear dependence, the property the paper asks of its mono-modal term.

    Args:
        eps: float > 0 added to `var(T) var(R)` (intensity units^4): keeps flat images finite
            (they give loss 1).
        name: str, the loss name.

    Call arguments:
        y_true: fixed image R `(B, *spatial, C)`, any float dtype.
        y_pred: warped moving image `T o phi`, same shape.

    Returns:
        Scalar float32 tensor in [0, 1], dimensionless.

    References:
        Theljani & Chen, section "Measuring similarity for mono-modal images": "an alternative
        measure to the correlation coefficient ... well suitable for measuring linear dependence
        between images". The stored text drops the formula that follows ("we set ..."); `1 -
        rho^2` is the reading taken here (the paper's equation number is not recoverable).
    """

    def __init__(self, eps=1e-8, name="global_cc"):
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.eps = float(eps)
        self.name = name

    def __call__(self, y_true, y_pred):
        fixed, warped, ndims = _check_pair(y_true, y_pred)
        axes = list(range(1, ndims + 2))
        fixed = fixed - tf.reduce_mean(fixed, axis=axes, keepdims=True)
        warped = warped - tf.reduce_mean(warped, axis=axes, keepdims=True)
        cov = tf.reduce_mean(fixed * warped, axis=axes)
        var_f = tf.reduce_mean(fixed * fixed, axis=axes)
        var_w = tf.reduce_mean(warped * warped, axis=axes)
        return tf.reduce_mean(1.0 - cov * cov / (var_f * var_w + self.eps))

    def get_config(self):
        return {"eps": self.eps, "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class PLS(_Serializable):
    """Parallel level sets (PLS) loss, the paper's multi-modal similarity.

    With `a = grad T`, `b = grad R` per voxel and channel (central differences, intensity per
    voxel) and `|x|_eps = sqrt(|x|^2 + eps^2)`,

        pls(p) = |a|_eps |b|_eps - sqrt(<a, b>^2 + eps^4),      loss = mean_p,c pls(p),

    the Ehrhardt & Arridge measure with psi = id, phi = sqrt. For eps = 0 this is
    `|a| |b| (1 - |cos angle(a, b)|)`: zero where the level sets are parallel, whatever the
    contrast (an inverted copy `1 - R` scores exactly as `R`), positive where they cross. For
    eps > 0 it is still >= 0 (`(|a|^2+eps^2)(|b|^2+eps^2) >= <a,b>^2 + eps^4`), and equal
    images give `|a|^2 + eps^2 - sqrt(|a|^4 + eps^4)` < eps^2 per voxel. The plain value
    scales with the gradient magnitudes (intensity^2 per voxel^2), about 5e-4 for two brain
    slices in [0, 1].

    `normalise=True` divides, per batch item, the sum of `pls(p)` by the sum of
    `|a|_eps |b|_eps`: `1 - sum sqrt(<a,b>^2 + eps^4) / sum |a|_eps |b|_eps`, a dimensionless
    value in [0, 1) that is also unchanged by a global intensity scaling of either image (up to
    eps), so that one weight lambda serves this measure and a mono-modal one in [0, 1].

    Args:
        eps: float > 0, gradient-norm smoothing in intensity units per voxel (default 0.01,
            below the typical 0.03-0.1 of brain tissue in [0, 1]).
        normalise: bool, the dimensionless ratio above instead of the plain mean.
        name: str, the loss name.

    Call arguments:
        y_true: fixed image R `(B, *spatial, C)`, any float dtype, every axis >= 2 voxels.
        y_pred: warped moving image `T o phi`, same shape.

    Returns:
        Scalar float32 tensor >= 0: intensity^2 / voxel^2, or dimensionless in [0, 1) when
        normalised.

    References:
        Theljani & Chen, section "Parallel level set measure": "we use parallel level sets
        similarity measure which is well suitable for measuring alignment between the gradients
        of two images" (formula not in the stored text). Ehrhardt & Arridge, "Vector-valued image
        processing by parallel level sets", IEEE TIP 2014.
    """

    def __init__(self, eps=0.01, normalise=False, name="pls"):
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.eps = float(eps)
        self.normalise = bool(normalise)
        self.name = name

    def _parts(self, y_true, y_pred):
        """`(|a|_eps |b|_eps, sqrt(<a,b>^2 + eps^4))`, each `(B, *spatial, C)` float32."""
        eps2 = self.eps * self.eps
        norm_f, norm_w, dot = _gradient_products(y_true, y_pred, eps2)
        return tf.sqrt(norm_f * norm_w), tf.sqrt(dot * dot + eps2 * eps2)

    def local(self, y_true, y_pred):
        """The per-voxel, per-channel map `pls(p)`, `(B, *spatial, C)` float32 (plain form)."""
        norms, dots = self._parts(y_true, y_pred)
        return norms - dots

    def __call__(self, y_true, y_pred):
        norms, dots = self._parts(y_true, y_pred)
        if not self.normalise:
            return tf.reduce_mean(norms - dots)
        axes = list(range(1, len(norms.shape)))
        return tf.reduce_mean(1.0 - tf.reduce_sum(dots, axis=axes)
                              / tf.reduce_sum(norms, axis=axes))

    def get_config(self):
        return {"eps": self.eps, "normalise": self.normalise, "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class NGF(_Serializable):
    """Normalised gradient fields (NGF) loss, the usual alternative multi-modal measure.

    With `a = grad T`, `b = grad R` (central differences) and `|x|_eps = sqrt(|x|^2 + eps^2)`,

        ngf(p) = 1 - (<a, b> / (|a|_eps |b|_eps))^2,      loss = mean_p,c ngf(p),

    in [0, 1]: about 0 where strong edges are parallel or anti-parallel (contrast inversion
    changes nothing), 1 where they are orthogonal or where either image is flat (|grad| << eps).

    Args:
        eps: float > 0, edge parameter in intensity units per voxel (default 0.01).
        name: str, the loss name.

    Call arguments:
        y_true: fixed image R `(B, *spatial, C)`, any float dtype, every axis >= 2 voxels.
        y_pred: warped moving image `T o phi`, same shape.

    Returns:
        Scalar float32 tensor in [0, 1], dimensionless.

    References:
        Haber & Modersitzki, "Intensity gradient based registration and fusion of multi-modal
        images", MICCAI 2006 (NGF); Ruhaak et al. 2013 (cited by Theljani & Chen, section
        "Parallel level set measure", among the multi-modal measures).
    """

    def __init__(self, eps=0.01, name="ngf"):
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.eps = float(eps)
        self.name = name

    def local(self, y_true, y_pred):
        """The per-voxel, per-channel map `ngf(p)`, `(B, *spatial, C)` float32."""
        norm_f, norm_w, dot = _gradient_products(y_true, y_pred, self.eps * self.eps)
        return 1.0 - dot * dot / (norm_f * norm_w)

    def __call__(self, y_true, y_pred):
        return tf.reduce_mean(self.local(y_true, y_pred))

    def get_config(self):
        return {"eps": self.eps, "name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class BendingEnergy(_Serializable):
    """Second-order regulariser: half the squared Frobenius norm of every component's Hessian.

        Bending(u) = 1/2 sum_c [ sum_a mean (d_aa u_c)^2 + 2 sum_{a<b} mean (d_ab u_c)^2 ]

    with `d_aa` the central second difference `u[x+e_a] - 2 u[x] + u[x-e_a]` (positions 1..L-2
    along a) and `d_ab` the forward mixed difference `u[x+e_a+e_b] - u[x+e_a] - u[x+e_b] + u[x]`;
    each mean runs over the batch and that difference's positions (the integral over the domain
    divided by its volume). Its kernel is exactly the affine fields, which first-order terms
    penalise: a quadratic `u_0 = q x_0 x_1` gives `q^2`, `u_0 = (k/2) x_a^2` gives `k^2 / 2`.

    Args:
        name: str, the loss name.

    Call arguments:
        y_true: ignored.
        y_pred: field `(B, *spatial, C)` in voxels (any float dtype), every axis >= 3 voxels.

    Returns:
        Scalar float32 tensor >= 0, voxels^-2 (displacement voxels per voxel^2, squared).

    References:
        Theljani & Chen, section "Regularisation": "a smoothing constraint on the first- and
        second order derivatives ... The second-order derivatives allows getting smooth
        transformations" beyond the kernel of first-order regularisers (formula not in the
        stored text). The full Hessian norm is the plate energy of Henn & Witsch (SIAM MMS 2005)
        with Poisson ratio 0, whose kernel is the affine maps.
    """

    def __init__(self, name="bending"):
        self.name = name

    @staticmethod
    def _forward_difference(x, axis):
        """`x[i + 1] - x[i]` along `axis` (one position fewer)."""
        ahead = [slice(None)] * len(x.shape)
        behind = [slice(None)] * len(x.shape)
        ahead[axis] = slice(1, None)
        behind[axis] = slice(None, -1)
        return x[tuple(ahead)] - x[tuple(behind)]

    def __call__(self, y_true, y_pred):
        del y_true
        field = _float32(y_pred)
        ndims = _spatial_ndims(field, "y_pred")
        diff = self._forward_difference
        total = tf.constant(0.0, tf.float32)
        for a in range(1, ndims + 1):
            d_a = diff(field, a)
            second = diff(d_a, a)  # = the central second difference at positions 1..L-2
            total += tf.reduce_mean(second * second)
            for b in range(a + 1, ndims + 1):
                mixed = diff(d_a, b)
                total += 2.0 * tf.reduce_mean(mixed * mixed)
        # reduce_mean also averages over the C components: restore the sum over c.
        return 0.5 * tf.cast(tf.shape(field)[-1], tf.float32) * total

    def get_config(self):
        return {"name": self.name}


@keras.saving.register_keras_serializable(package="mdregnet")
class VariationalRegulariser(_Serializable):
    """The regulariser of Theljani & Chen: first- and second-order smoothing plus det control.

        R(u) = alpha_grad * D(u) + alpha_hess * B(u) + alpha_jac * J(u)

      * D(u) = 1/2 sum_{c,a} mean (d_a u_c)^2, the diffusion term (forward differences), i.e.
        `Grad("l2")` rescaled from its average over axes and components to the sum;
      * B(u) = `BendingEnergy` (second-order, zero exactly for affine fields);
      * J(u) = `JacobianPenalty(jac_eps)` = mean relu(jac_eps - det(I + grad u)): zero while
        det >= jac_eps everywhere, growing linearly as det falls to 0 and below, so it penalises
        every voxel with det <= 0 (folding, CONVENTIONS.md) once jac_eps > 0.
    Every term is a mean over the grid (the domain integral divided by its volume), in voxels.

    Args:
        alpha_grad, alpha_hess, alpha_jac: floats >= 0, the weights of D, B and J.
        jac_eps: float >= 0, the determinant margin of J (dimensionless).
        name: str, the loss name.

    Call arguments:
        y_true: ignored.
        y_pred: displacement `(B, *spatial, ndims)` in voxels, any float dtype, every axis >= 3.

    Returns:
        Scalar float32 tensor >= 0; `terms(u)` gives the three unweighted values by name
        ('diffusion', 'bending', 'jacobian').

    References:
        Theljani & Chen, section "Regularisation": "a smoothing constraint on the first- and
        second order derivatives and a constraint on the determinant of the transformation";
        the loss (2) is `S + lambda R` with lambda = 60 ("Choice of lambda in (2)"). The stored
        text drops the formulas, so the three weights and the form of J are choices: J reuses
        `JacobianPenalty`, a hinge defined for every determinant (a barrier such as
        (det - 1)^2 / det, used by the variational models the paper cites, is undefined at
        det <= 0, where a network can land).
    """

    def __init__(self, alpha_grad=1.0, alpha_hess=1.0, alpha_jac=1.0, jac_eps=0.1,
                 name="variational_regulariser"):
        for key, value in (("alpha_grad", alpha_grad), ("alpha_hess", alpha_hess),
                           ("alpha_jac", alpha_jac)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0; got {value}")
        self.alpha_grad = float(alpha_grad)
        self.alpha_hess = float(alpha_hess)
        self.alpha_jac = float(alpha_jac)
        self.jac_eps = float(jac_eps)
        self.name = name
        self._grad = Grad("l2")
        self._bending = BendingEnergy()
        self._jacobian = JacobianPenalty(eps=jac_eps)

    def terms(self, y_pred):
        """Unweighted `{'diffusion': D, 'bending': B, 'jacobian': J}` of a displacement."""
        field = _float32(y_pred)
        ndims = _spatial_ndims(field, "y_pred")
        # Grad("l2") = (1/ndims) sum_a mean_{positions, c}: times ndims * C gives the sum.
        scale = 0.5 * ndims * tf.cast(tf.shape(field)[-1], tf.float32)
        return {"diffusion": scale * self._grad(None, field),
                "bending": self._bending(None, field),
                "jacobian": self._jacobian(None, field)}

    def __call__(self, y_true, y_pred):
        del y_true
        terms = self.terms(y_pred)
        return (self.alpha_grad * terms["diffusion"] + self.alpha_hess * terms["bending"]
                + self.alpha_jac * terms["jacobian"])

    def get_config(self):
        return {"alpha_grad": self.alpha_grad, "alpha_hess": self.alpha_hess,
                "alpha_jac": self.alpha_jac, "jac_eps": self.jac_eps, "name": self.name}


_LOSSES.update({"cc": GlobalCC, "pls": PLS, "ngf": NGF, "bending": BendingEnergy,
                "variational": VariationalRegulariser})
__all__ += ["GlobalCC", "PLS", "NGF", "BendingEnergy", "VariationalRegulariser"]
