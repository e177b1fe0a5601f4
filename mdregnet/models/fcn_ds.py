"""FCN with deep self-supervision: the MDReg-Net precursor (displacement fields, not SVFs).

Li & Fan, "Non-rigid image registration using fully convolutional networks with deep
self-supervision", arXiv:1709.00799, 2017 (`../shared/papers/fcn-deep-self-supervision.md`).
Sections used: Methods (eqs. 1-2), "Image registration using FCNs ...", "Multi-resolution image
registration with deep self-supervision", "Network training" (all numbers below), Fig. 2
(ablation). Every choice the paper leaves open is a hyper-parameter with a comment saying what
was chosen and why.

Network (Fig. 1b, Network training). One FCN takes the two-channel image `[moving, fixed]`:

    Conv1(32) -> Pool1 -> Conv2(64) -> Pool2 -> Conv3(128) --------------> Reg1   1/4 resolution
                                               -> Deconv1(64) -> Conv4(64) -> Reg2   1/2
                                                               -> Deconv2(32) -> Reg3   full

Conv/Deconv layers are 3^d kernels followed by batch normalisation and ReLU; pooling has kernel 3
and stride 2; deconvolutions have kernel 3 and stride 2; each regression layer Reg is a linear
convolution with `ndims` filters giving a DISPLACEMENT field D in voxels of its own grid ("the
same spatial resolution of downsampled input images"). The fields are independent estimates, one
per resolution, optimised jointly ("jointly optimizes deformation fields at all resolutions"): no
field is added to or composed with another. The registration result is Reg3's field.

Loss (eqs. 1-2, deep self-supervision). Loss layer l evaluates eq. 1 on Reg l's grid,

    L_l = -NCC(I_f^l, I_m^l o D_l) + lam * TV(D_l),      total = sum_l w_l L_l,

with (w_1, w_2, w_3) = (1, 0.6, 0.3) for losses 1 to 3 ("weights coefficients as 1, 0.6, and
0.3"). Loss l belongs to regression layer l, and the layers are numbered along the network as the
Conv and Deconv layers are, so the COARSEST level (Reg1, 1/4) has weight 1 and full resolution
(Reg3) 0.3. The same reading is supported by the ablation text: the model without pooling keeps
"Conv modules 1 to 3, one regression layer, and one loss layer", i.e. Reg1 follows Conv3.
`I^l` are the images at level l's resolution (average pooling, see `defaults`).

Ablations of Fig. 2, as hyper-parameters of the same model:
    pooling=True,  levels=3  the proposed multi-resolution model (default);
    pooling=False, levels=1  "without pooling layers": Conv1-3 at full resolution, one Reg, one
                             loss;
    pooling=True,  levels=1  "coarse-grained" model: Conv1, Pool1, Conv2, Pool2, Conv3, Reg1 at
                             1/4, then "one interpolation layer": trilinear up-sampling of the
                             field (x4, magnitude scaled) to full resolution, where its single
                             loss is evaluated (as in the DirNet/ssEMnet models it stands for).
    pooling=True,  levels=2  (not in the paper) Reg1 at 1/4 and Reg2 at 1/2, Reg2's field
                             interpolated to full resolution as in the coarse-grained model.
General rule: regression layer r (r = 1..levels) lives on grid 2 - (r - 1) (pyramid index, see
below); the loss of the LAST regression layer is evaluated at full resolution, through linear
interpolation of its field if that field is coarser; the others at their own resolution.

Output keys. Levels are indexed FINE TO COARSE by the pyramid index k, as `layers.AvgPoolPyramid`
returns its list: level k has spatial size `spatial / 2**k` (k = 0 full, 1 half, 2 quarter). Only
levels that have a loss layer appear:
    'warped'            (B, *spatial, 1) moving image warped by 'disp' (full resolution)
    'disp'              (B, *spatial, ndims) final displacement, full-resolution voxels
    'disp_level{k}'     (B, *spatial / 2**k, ndims) the field of level k's loss, voxels of grid k
    'warped_level{k}'   (B, *spatial / 2**k, 1) I_m^k warped by disp_level{k} on grid k
    'disp_coarse'       only when the last regression layer is coarser than full resolution
                        (coarse-grained model): its raw output, voxels of its own grid
So the default model returns levels 2, 1, 0 (= Reg1, Reg2, Reg3 of the paper, loss weights 1,
0.6, 0.3); 'disp_level0' is 'disp' and 'warped_level0' is 'warped'. The objective's terms use the
same k: 'sim_level{k}', 'tv_level{k}', 'loss_level{k}', 'weight_level{k}'.
"""

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models.registry import Method, register

#: Training settings of the paper (Network training), for the training entry point.
PAPER_TRAINING = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64,
                  "batch_size_no_pooling": 32, "iterations": 10000}

#: Resolution steps of the full model: two pooling layers of stride 2 (Reg1 at 1/4).
_DEPTH = 2
_POOL_TYPES = ("max", "avg")


def supervised_levels(hp):
    """Pyramid indices k of the levels that have a loss layer, in the paper's order Reg1, Reg2...

    Args:
        hp: resolved hyper-parameters (`pooling`, `levels`).

    Returns:
        `(levels, reg_grids)`: list of k (coarse to fine, the order of `loss_weights`) and the
        grid index of each regression layer's raw output (equal except for the last regression
        layer of a coarse-grained model, whose loss is at k = 0).
    """
    n = int(hp["levels"])
    if not hp["pooling"]:
        if n != 1:
            raise ValueError(f"pooling=False keeps one regression layer (paper, Network training); "
                             f"got levels={n}")
        return [0], [0]
    if not 1 <= n <= _DEPTH + 1:
        raise ValueError(f"levels must be 1, 2 or 3 with pooling, got {n}")
    reg_grids = [_DEPTH - r for r in range(n)]
    return reg_grids[:-1] + [0], reg_grids


def _conv_bn_relu(x, filters, hp, transpose=False, name=None):
    """3^d (de)convolution, 'same' padding, then batch normalisation and ReLU (Fig. 1b)."""
    ndims = len(x.shape) - 2
    if transpose:
        layer = keras.layers.Conv3DTranspose if ndims == 3 else keras.layers.Conv2DTranspose
        strides = 2
    else:
        layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
        strides = 1
    x = layer(filters, hp["kernel_size"], strides=strides, padding="same", name=name)(x)
    if hp["batch_norm"]:
        x = keras.layers.BatchNormalization(momentum=hp["bn_momentum"], epsilon=1e-3,
                                            name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _pool(x, hp, name):
    ndims = len(x.shape) - 2
    if hp["pool_type"] == "max":
        layer = keras.layers.MaxPooling3D if ndims == 3 else keras.layers.MaxPooling2D
    else:
        layer = keras.layers.AveragePooling3D if ndims == 3 else keras.layers.AveragePooling2D
    return layer(hp["pool_size"], strides=2, padding="same", name=name)(x)


def _regression(x, ndims, hp, name):
    """Regression layer Reg: linear conv with `ndims` filters, a displacement in voxels."""
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    return layer(ndims, hp["reg_kernel"], padding="same", name=name,
                 kernel_initializer=keras.initializers.RandomNormal(stddev=hp["reg_init_std"]),
                 bias_initializer="zeros")(x)


@register("fcn_ds")
class FCNDeepSelfSupervision(Method):
    """Li & Fan 2017 FCN with deep self-supervision; see the module docstring for the layout.

    Model call: `model([moving, fixed])`, each `(B, *spatial, 1)` float32 in [0, 1], `spatial`
    2D or 3D and divisible by 4; returns the dict of the module docstring (displacements in
    voxels, `warped(p) = moving(p + disp(p))`).
    """

    diffeomorphic = False
    # Pool1 and Pool2, stride 2 each (Reg1 at 1/4 resolution). A class attribute, so it also
    # applies to the pooling=False ablation, which itself would accept any size.
    divisor = 2 ** _DEPTH
    defaults = {
        # Network training: "32, 64, 128, and 64 kernels ... for Conv layer 1, 2, 3, and 4".
        "conv_features": [32, 64, 128, 64],
        # "64 and 32 kernels are used for Deconv layer 1 and 2 ... kernel size 3 and stride 2".
        "deconv_features": [64, 32],
        # "kernel size 3" for the Conv and Deconv layers. The paper also writes "stride 2" for the
        # Conv layers, which contradicts its own network: with stride-2 convolutions AND stride-2
        # pooling, two deconvolutions cannot return to the input resolution (Reg3 and the
        # no-pooling model are at full resolution). Convolutions here have stride 1 (as in FCN,
        # Long et al. 2015, which the paper builds on); down-sampling is done by pooling only.
        "kernel_size": 3,
        # "For pooling layers, kernel size is set to 3, and stride 2" (stride fixed at 2). The
        # pooling type is not given: max pooling, as FCN/VGG (the paper's refs [3, 5]) and the
        # one public re-implementation we found (a PyTorch `reg_net` citing arXiv:1709.00799).
        "pool_type": "max",
        "pool_size": 3,
        # Fig. 1b: Conv/Deconv -> BN -> ReLU. Momentum and epsilon: TensorFlow's defaults (0.99,
        # 1e-3), the framework the paper used; not given in the paper.
        "batch_norm": True,
        "bn_momentum": 0.99,
        # "3 kernels are used for regression layers 1, 2 and 3" (3 output channels in 3D, ndims
        # here). Their kernel size is not given: 1 (per-voxel linear regression), as FCN's score
        # layers and the public re-implementation; initialised N(0, 1e-5), zero bias, so training
        # starts at the identity (VoxelMorph's flow-head choice; the paper is silent).
        "reg_kernel": 1,
        "reg_init_std": 1e-5,
        # Ablation (Fig. 2): see the module docstring. levels = number of regression layers.
        "pooling": True,
        "levels": 3,
        # "weights coefficients as 1, 0.6, and 0.3" for losses 1 to 3, in the paper's order of the
        # regression layers Reg1 (coarsest, 1/4), Reg2 (1/2), Reg3 (full). A model with fewer
        # regression layers uses the first ones (the single-loss ablations get weight 1).
        "loss_weights": [1.0, 0.6, 0.3],
        # Eq. 1 trade-off lam: the paper gives no value. 0.35 is the value the same group selected
        # (on validation Dice) for the same NCC + total-variation objective in MDReg-Net (Zhuo &
        # Fan); losses.Grad averages over voxels, the convention of that lambda.
        "lam": 0.35,
        # Eq. 1 similarity: "normalized cross-correlation"; the paper does not say global or
        # local. Local NCC with a 9^d window (VoxelMorph; as mdregnet's other models), the same
        # window at every level.
        "ncc_window": 9,
    }

    def build_model(self, input_shape, hp):
        ndims = len(input_shape)
        if hp["pool_type"] not in _POOL_TYPES:
            raise ValueError(f"pool_type must be one of {_POOL_TYPES}, got {hp['pool_type']!r}")
        conv_f = list(hp["conv_features"])
        deconv_f = list(hp["deconv_features"])
        if len(conv_f) != 4 or len(deconv_f) != 2:
            raise ValueError(f"conv_features needs 4 values and deconv_features 2 (Fig. 1b), got "
                             f"{conv_f} and {deconv_f}")
        sup_levels, reg_grids = supervised_levels(hp)
        n_reg = len(reg_grids)

        moving = keras.Input((*input_shape, 1), name="moving")
        fixed = keras.Input((*input_shape, 1), name="fixed")
        x = keras.layers.Concatenate(name="pair")([moving, fixed])  # two-channel input

        # Conv1 -> (Pool1) -> Conv2 -> (Pool2) -> Conv3 -> Reg1
        h = _conv_bn_relu(x, conv_f[0], hp, name="conv1")
        if hp["pooling"]:
            h = _pool(h, hp, "pool1")
        h = _conv_bn_relu(h, conv_f[1], hp, name="conv2")
        if hp["pooling"]:
            h = _pool(h, hp, "pool2")
        h = _conv_bn_relu(h, conv_f[2], hp, name="conv3")
        fields = [_regression(h, ndims, hp, "reg1")]
        # Deconv1 -> Conv4 -> Reg2 ; Deconv2 -> Reg3
        if n_reg >= 2:
            h = _conv_bn_relu(h, deconv_f[0], hp, transpose=True, name="deconv1")
            h = _conv_bn_relu(h, conv_f[3], hp, name="conv4")
            fields.append(_regression(h, ndims, hp, "reg2"))
        if n_reg >= 3:
            h = _conv_bn_relu(h, deconv_f[1], hp, transpose=True, name="deconv2")
            fields.append(_regression(h, ndims, hp, "reg3"))

        outputs = {}
        if reg_grids[-1] != 0:  # coarse-grained model: "one interpolation layer" (trilinear)
            outputs["disp_coarse"] = fields[-1]
            fields[-1] = layers.RescaleTransform(2 ** reg_grids[-1], name="interpolation")(
                fields[-1])
        coarse = [k for k in sup_levels if k > 0]
        pyramid = None
        if coarse:
            pyramid = layers.AvgPoolPyramid(max(coarse) + 1, name="pyramid")(moving)
        for k, field in zip(sup_levels, fields):
            if k == 0:
                continue
            outputs[f"disp_level{k}"] = field
            outputs[f"warped_level{k}"] = layers.SpatialTransformer(name=f"warp_level{k}")(
                [pyramid[k], field])
        disp = fields[-1]
        warped = layers.SpatialTransformer(name="warp")([moving, disp])
        outputs["disp_level0"] = disp
        outputs["warped_level0"] = warped
        outputs["disp"] = disp
        outputs["warped"] = warped
        return keras.Model([moving, fixed], outputs, name="fcn_ds")

    def build_objective(self, hp):
        levels, _ = supervised_levels(hp)
        weights = list(hp["loss_weights"])
        if len(weights) < len(levels):
            raise ValueError(f"loss_weights needs at least {len(levels)} values (one per "
                             f"regression layer), got {weights}")
        return DeepSelfSupervisionObjective(levels, weights[:len(levels)], lam=hp["lam"],
                                            ncc_window=hp["ncc_window"])


class DeepSelfSupervisionObjective:
    """Weighted sum of one eq.-1 loss per resolution level (paper: loss 1 to 3).

    `total = sum_l w_l [-NCC(I_f^{k_l}, I_m^{k_l} o D_l) + lam * TV(D_l)]`, with `I^k` the images
    average-pooled k times (kernel 3, stride 2, `layers.avg_pool_pyramid`), `TV = losses.Grad('l1')`
    (eq. 2, mean over voxels of the field's own grid; the field is in voxels of that grid, so the
    gradient is dimensionless and the same lam applies at every level), `NCC = losses.NCC`.

    Args:
        levels: pyramid indices k of the loss layers in the order of `weights` (paper order,
            coarsest first: `[2, 1, 0]` for the full model).
        weights: loss weight of each level (paper: 1, 0.6, 0.3).
        lam: regularisation weight of eq. 1.
        ncc_window: local NCC window per axis, voxels.

    Call arguments:
        moving: `(B, *spatial, 1)` moving image (unused: the warped images come from `outputs`;
            kept for the registry's objective signature).
        fixed: `(B, *spatial, 1)` fixed image at full resolution, pooled here to each level.
        outputs: the model's dict; uses 'warped_level{k}' and 'disp_level{k}'.

    Returns:
        `(total, terms)`: float32 scalar; `terms` has, per level k, 'sim_level{k}' (-NCC),
        'tv_level{k}', 'loss_level{k}' (= sim + lam * tv) and 'weight_level{k}', and the weighted
        sums 'sim' and 'tv'.
    """

    def __init__(self, levels, weights, lam, ncc_window):
        if len(levels) != len(weights):
            raise ValueError(f"{len(levels)} levels but {len(weights)} weights")
        self.levels = [int(k) for k in levels]
        self.weights = [float(w) for w in weights]
        self.lam = float(lam)
        self.similarity = losses.NCC(window=ncc_window)
        self.regulariser = losses.Grad("l1")

    def __call__(self, moving, fixed, outputs):
        fixed_pyr = layers.avg_pool_pyramid(fixed, max(self.levels) + 1)
        terms = {}
        total = sim_total = tv_total = 0.0
        for k, w in zip(self.levels, self.weights):
            sim = self.similarity(fixed_pyr[k], outputs[f"warped_level{k}"])
            tv = self.regulariser(None, outputs[f"disp_level{k}"])
            loss = sim + self.lam * tv
            terms[f"sim_level{k}"] = sim
            terms[f"tv_level{k}"] = tv
            terms[f"loss_level{k}"] = loss
            terms[f"weight_level{k}"] = tf.constant(w, tf.float32)
            total += w * loss
            sim_total += w * sim
            tv_total += w * tv
        terms["sim"] = sim_total
        terms["tv"] = tv_total
        return tf.cast(total, tf.float32), terms
