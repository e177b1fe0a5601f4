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

__all__ = ["NCC", "MSE", "Grad", "JacobianPenalty", "bidirectional", "get"]


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


_LOSSES = {"ncc": NCC, "mse": MSE, "grad": Grad, "jacobian": JacobianPenalty}


def get(name, **kwargs):
    """Builds a loss by name.

    Args:
        name: one of "ncc", "mse", "grad", "jacobian" (case-insensitive).
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
