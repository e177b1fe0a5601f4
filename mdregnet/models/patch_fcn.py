"""Patch-based diffeomorphic FCN with an LDDMM differential operator, in a 3-stage cascade.

Wu, Zhou, Lin, Wang & Tan, "Fast diffeomorphic image registration using patch based fully
convolutional networks" (`../shared/papers/patch-based-diffeomorphic-fcn.md`). Sections used:
II-A (SVF per patch, eq. 1), II-B (operator L, eqs. 3-4), II-C (cascade, Fig. 1a-b; FCN, Fig. 1c),
II-D (all numbers). Every choice the paper leaves open is a hyper-parameter or a comment saying
what was chosen and why.

Name: the paper gives its method no acronym (it calls it "our FCN" / "patch-based networks");
it is registered as "patch_fcn", the two words the title and the field use for it.

Data flow of a model built with `train_stage = k` (stages 1..k; 1..k-1 frozen, k trained):

    v_1 = FCN_1(M, F)               U_1 = exp(v_1)                      Inv_1 = exp(-v_1)
    v_j = FCN_j(M o Phi_{j-1}, F)   U_j = u_j + U_{j-1} o (id + u_j)    u_j = exp(v_j)
                                    Inv_j = Inv_{j-1} + inv_j o (id + Inv_{j-1}),
                                                                        inv_j = exp(-v_j)
    warped = M o Phi_k,  M o Phi(p) = M(p + U_k(p))

(`exp` = scaling and squaring, `layers.VecInt`; composition `layers.ComposeTransform`, CONVENTIONS
"Composition": stage j refines the already warped image, so its map is applied FIRST and the earlier
ones after it, `Phi_j = Phi_{j-1} o phi_j`; the inverse is composed in the reverse order,
`Phi_j^-1 = phi_j^-1 o Phi_{j-1}^-1`.) The paper's "the input of the N_k th FCN is the warped moving
image M o phi^-1_{N_1 N_{k-1}} and fixed image F ... Finally, we can obtain the deformation by
combining N_r of phi together" (II-C).

The FCN of one stage (Fig. 1c; `stage_network`), input the 2-channel pair, sizes divisible by 16:

    level 0 (full): conv 3^d, f0
    level l = 1..4: conv 2^d stride 2 (down), f_l  +  [avg-pool^l(input) -> conv 3^d, f_l]
                    -> conv 3^d, f_l                        ("four times of average pooling
                                                              followed by a convolutional layer
                                                              ... added to the feature maps")
    decoder l = 3..0: transposed conv 2^d stride 2, f_l -> concat skip (encoder level l)
                    -> conv 3^d, f_l
    heads: a 3^d conv to ndims channels on the decoder features at 1/16 (the bottleneck), 1/8, 1/4
           and 1/2, each up-sampled trilinearly to full size, plus one at full size: the five are
           added into the velocity ("five different outputs are added together").
All convolutions but the heads are followed by LeakyReLU ("3D convolutions followed by Leaky ReLU
activations in each layer"); kernels 3 and 2 alternate ("Small kernels of sizes 3x3x3 and 2x2x2
are used alternatively"). Silent points, chosen here: channels `features` (below), LeakyReLU slope
0.2 and heads initialised N(0, 1e-5) with zero bias (VoxelMorph's; the model starts at the
identity), average pooling 2^d / stride 2 (aligned with the stride-2 kernel-2 convolutions), one
conv per level (the alternation read literally), up-sampling of the heads by `layers.resize`
without magnitude scaling (they are "feature maps", summed into one velocity in full-resolution
voxels). The stage networks take inputs of any size divisible by 16 (patches at training and
test time, or whole volumes).

Loss (eq. 3, one stage): `-NCC_7(F, M o Phi_k) + lam * ||L v_k||^2`, `L = -alpha_k Lap + Id`
(`losses.OperatorNorm`; for an SVF the paper's `sum_j ||L v||^2 dt` is `||L v||^2`, see there).
Eq. 4: the paper back-propagates the gradient "transformed to the original space", i.e. the
V-gradient `K dE/dv` with `K = (L^T L)^-1`, which for the loss `E = sim + lam ||Lv||^2` is
`K dsim/dv + 2 lam v` (eq. 4 up to the factor 1 / (2 sigma^2)). `sobolev_gradient=True` does
exactly this: `SobolevGradient` is the identity forward and multiplies the incoming gradient of
v_k by K (the DCT-diagonalised inverse of `OperatorNorm`'s own operator) on the way back.

Output keys (`k` = train_stage; stage index j = 1..k as in the paper, 1 coarsest):
    'warped'                 (B, *spatial, 1)     M o Phi_k
    'disp', 'inverse_disp'   (B, *spatial, ndims) composed forward / inverse displacement, voxels
    'velocity'               (B, *spatial, ndims) v_k, the trained stage's SVF (regularised). For
                             k > 1 the transform is NOT exp('velocity') but the composition.
    'velocity_stage{j}', 'disp_stage{j}', 'inverse_disp_stage{j}': stage j's own v_j, exp(v_j),
                             exp(-v_j).

Training the cascade (II-D: "For training the current level of FCN, parameters of previous levels
of FCNs are fixed"): train stage 1, then build `train_stage=2` with `init_from` = the directory
of the stage-1 model (`models.save` output, e.g. the `model/` folder `python -m mdregnet.train`
writes), train, then stage 3 from the stage-2 model. With the train CLI:

    python -m mdregnet.train --model patch_fcn --data_dir D --workdir runs/pfcn1
    python -m mdregnet.train --model patch_fcn --data_dir D --workdir runs/pfcn2 \
        --hparams '{"train_stage": 2, "init_from": "runs/pfcn1/model"}'
    python -m mdregnet.train --model patch_fcn --data_dir D --workdir runs/pfcn3 \
        --hparams '{"train_stage": 3, "init_from": "runs/pfcn2/model"}'

runs/pfcn3/model is the full cascade (`models.load`, then `mdregnet.patches.register_by_patches`
for the paper's patch inference, or `model([moving, fixed])` on whole volumes). `init_from` is a
path as given (relative to the working directory); it is read when the model is built. A saved
stage-k model holds the weights of all its stages, so `models.load` does not need `init_from`:
if that directory no longer exists, building warns and `load` fills every stage from its own
weights file. Note: the train CLI feeds whole volumes (any size divisible by 16; the networks are
fully convolutional); the paper's batches of 16 patch pairs of 64^3 come from
`mdregnet.patches.patch_pair_dataset`, which the CLI does not use yet.
`load_earlier_stages(model, directory)` does what `init_from` does, for code that builds models
itself.
"""

import math
import os
import warnings

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models import blocks
from mdregnet.models.registry import Method, build, read_config, register

#: Training settings of the paper (II-D), for training code: Adam, lr 1e-4, batches of 16 patch
#: pairs of 64^3, sampled equally from foreground and background.
PAPER_TRAINING = {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 16, "patch_size": 64}

#: Number of down-sampling steps of the FCN (four average-pooling paths): sizes divisible by 16.
DEPTH = 4

_SERIALIZABLE = keras.saving.register_keras_serializable(package="mdregnet")


# ------------------------------------------------------------------------------------------------
# Eq. 4: the kernel K = (L^T L)^-1 and the layer that applies it to the gradient
# ------------------------------------------------------------------------------------------------
def _dct_along(x, axis, inverse=False):
    """Orthonormal DCT-II (or its inverse, DCT-III) of `x` along `axis` (float32)."""
    rank = x.shape.rank
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    y = tf.transpose(x, perm)
    y = tf.signal.idct(y, type=2, norm="ortho") if inverse else tf.signal.dct(y, type=2,
                                                                                norm="ortho")
    return tf.transpose(y, perm)


def apply_kernel(field, alpha, spacing=1.0):
    """`K f` with `K = (L^T L)^-1`, `L = -alpha Lap + Id` as in `losses.OperatorNorm`.

    That operator (reflecting faces) is diagonal in the DCT-II basis with eigenvalues
    `1 + alpha mu_k`, `mu_k = sum_a (2 - 2 cos(pi k_a / n_a)) / h^2`, and symmetric, so
    `K f = IDCT[DCT[f] / (1 + alpha mu_k)^2]`, channel by channel. `K` is a low-pass filter with
    gain 1 at the constant field.

    Args:
        field: `(B, *spatial, C)` float tensor.
        alpha: float >= 0; spacing: grid spacing h (as `OperatorNorm`).

    Returns:
        float32 tensor of the shape of `field`.

    References:
        Paper eq. 4 (K = (L^dagger L)^-1); Beg et al., IJCV 2005.
    """
    x = tf.cast(tf.convert_to_tensor(field), tf.float32)
    ndims = x.shape.rank - 2
    for axis in range(1, ndims + 1):
        x = _dct_along(x, axis)
    mu = 0.0
    for axis in range(1, ndims + 1):
        n = tf.shape(x)[axis]
        k = tf.cast(tf.range(n), tf.float32)
        eig = (2.0 - 2.0 * tf.cos(math.pi * k / tf.cast(n, tf.float32))) / float(spacing) ** 2
        shape = [1] * (ndims + 2)
        shape[axis] = -1
        mu = mu + tf.reshape(eig, shape)
    x = x / tf.square(1.0 + float(alpha) * mu)
    for axis in range(1, ndims + 1):
        x = _dct_along(x, axis, inverse=True)
    return x


def sobolev_identity(velocity, alpha, spacing=1.0):
    """Identity forward; backward multiplies the gradient by `K` (`apply_kernel`)."""

    @tf.custom_gradient
    def identity(v):
        def grad(upstream):
            return tf.cast(apply_kernel(upstream, alpha, spacing), upstream.dtype)

        return tf.identity(v), grad

    return identity(velocity)


@_SERIALIZABLE
class SobolevGradient(keras.layers.Layer):
    """Identity on the velocity whose backward pass is the paper's eq. 4 (V-gradient).

    Args:
        alpha: the stage's alpha of `L = -alpha Lap + Id`.
        spacing: grid spacing h of `L` (as `losses.OperatorNorm`).

    Call arguments:
        inputs: SVF `(B, *spatial, ndims)` in voxels.

    Returns:
        The same tensor; `d loss / d inputs` is `K (d loss / d outputs)`, `K = (L^T L)^-1`.

    References:
        Paper II-B, eq. 4: "the gradient of the loss function ... is transformed to the original
        space to realize the backpropagation".
    """

    def __init__(self, alpha, spacing=1.0, **kwargs):
        super().__init__(**kwargs)
        if not alpha >= 0 or not spacing > 0:
            raise ValueError(f"alpha must be >= 0 and spacing > 0, got {alpha}, {spacing}")
        self.alpha = float(alpha)
        self.spacing = float(spacing)

    def call(self, inputs):
        return sobolev_identity(inputs, self.alpha, self.spacing)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, spacing=self.spacing)
        return config


@_SERIALIZABLE
class TrilinearUpsample(keras.layers.Layer):
    """Linear (bi/trilinear) up-sampling of feature maps by an integer factor, no magnitude
    scaling (`layers.resize`: coarse voxel i at fine `s*i + (s-1)/2`, as the 2^d pooling grid).

    Call arguments:
        inputs: `(B, *spatial, C)`.

    Returns:
        `(B, *spatial * factor, C)`.
    """

    def __init__(self, factor, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, inputs):
        return layers.resize(inputs, zoom_factor=self.factor)

    def compute_output_shape(self, input_shape):
        spatial = [None if n is None else n * self.factor for n in input_shape[1:-1]]
        return (input_shape[0], *spatial, input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(factor=self.factor)
        return config


# ------------------------------------------------------------------------------------------------
# The FCN of Fig. 1c
# ------------------------------------------------------------------------------------------------
def stage_network(ndims, features, name):
    """One stage's FCN (Fig. 1c): `[moving, fixed] -> velocity`; see the module docstring.

    Args:
        ndims: 2 or 3.
        features: 5 channel counts, for the full, 1/2, 1/4, 1/8 and 1/16 resolution levels.
        name: model name; every layer name starts with it.

    Returns:
        `keras.Model` taking two `(B, *spatial, 1)` images (any spatial size divisible by 16) and
        returning the SVF `(B, *spatial, ndims)` in voxels.
    """
    f = [int(n) for n in features]
    pool_layer = keras.layers.AveragePooling3D if ndims == 3 else keras.layers.AveragePooling2D
    moving = keras.Input((None,) * ndims + (1,), name="moving")
    fixed = keras.Input((None,) * ndims + (1,), name="fixed")
    x = keras.layers.Concatenate(name=f"{name}_pair")([moving, fixed])
    h = blocks.conv(x, f[0], kernel_size=3, name=f"{name}_enc0")
    skips = [h]
    pooled = x
    for level in range(1, DEPTH + 1):
        h = blocks.conv(h, f[level], strides=2, kernel_size=2, name=f"{name}_down{level}")
        pooled = pool_layer(2, strides=2, name=f"{name}_pool{level}")(pooled)
        side = blocks.conv(pooled, f[level], kernel_size=3, name=f"{name}_poolconv{level}")
        h = keras.layers.Add(name=f"{name}_addpool{level}")([h, side])
        h = blocks.conv(h, f[level], kernel_size=3, name=f"{name}_enc{level}")
        skips.append(h)
    heads = [TrilinearUpsample(2 ** DEPTH, name=f"{name}_upsample{DEPTH}")(
        blocks.flow_head(h, ndims, name=f"{name}_head{DEPTH}"))]
    for level in range(DEPTH - 1, -1, -1):
        h = blocks.deconv(h, f[level], strides=2, kernel_size=2, name=f"{name}_up{level}")
        h = keras.layers.Concatenate(name=f"{name}_skip{level}")([h, skips[level]])
        h = blocks.conv(h, f[level], kernel_size=3, name=f"{name}_dec{level}")
        head = blocks.flow_head(h, ndims, name=f"{name}_head{level}")
        if level:
            head = TrilinearUpsample(2 ** level, name=f"{name}_upsample{level}")(head)
        heads.append(head)
    velocity = keras.layers.Add(name=f"{name}_velocity")(heads)
    return keras.Model([moving, fixed], velocity, name=name)


def stage_networks(model):
    """The stage FCNs `[stage1, stage2, ...]` of a patch_fcn model (nested `keras.Model`s)."""
    out = []
    names = {layer.name for layer in model.layers}
    while f"stage{len(out) + 1}" in names:
        out.append(model.get_layer(f"stage{len(out) + 1}"))
    if not out:
        raise ValueError(f"model {model.name!r} has no stage networks (not a patch_fcn model)")
    return out


def load_earlier_stages(model, directory):
    """Copies the weights of stages 1..k-1 from a saved patch_fcn model into `model` (stage k).

    Args:
        model: a patch_fcn model built with `train_stage = k >= 2`.
        directory: a `models.save` directory of a patch_fcn model with `train_stage >= k - 1` and
            the same `features` (e.g. `<workdir>/model` of the previous stage's training run).

    Returns:
        The number of stages copied (k - 1).

    Raises:
        MissingFileError / InvalidInputError (FileNotFoundError / ValueError): no such model, or
            a model that is not a patch_fcn model with those stages.
    """
    directory = os.fspath(directory)
    config = read_config(directory)
    if config["name"] != "patch_fcn":
        raise ValueError(f"{directory}: a {config['name']!r} model, not a patch_fcn model")
    targets = stage_networks(model)[:-1]
    if not targets:
        raise ValueError("load_earlier_stages: the model has one stage (train_stage=1); there are "
                         "no earlier stages to load")
    hp = dict(config["hparams"], init_from=None)
    if int(hp.get("train_stage", 1)) < len(targets):
        raise ValueError(f"{directory}: holds stages 1..{hp.get('train_stage', 1)}, the model "
                         f"needs stages 1..{len(targets)}")
    source = build("patch_fcn", config["input_shape"], **hp)
    weights = os.path.join(directory, "model.weights.h5")
    try:
        source.load_weights(weights)
    except Exception as err:  # h5py/keras raise many types for a missing or foreign file
        raise ValueError(f"{weights}: cannot load weights ({type(err).__name__}: {err})") \
            from None
    for target, stage in zip(targets, stage_networks(source)):
        values = stage.get_weights()
        if [w.shape for w in values] != [tuple(w.shape) for w in target.weights]:
            raise ValueError(f"{directory}: {stage.name} has other layer sizes than this model's "
                             "(different 'features')")
        target.set_weights(values)
    return len(targets)


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------
@register("patch_fcn")
class PatchFCN(Method):
    """Patch-based diffeomorphic FCN cascade (Wu et al.); see the module docstring."""

    diffeomorphic = True
    divisor = 2 ** DEPTH
    defaults = {
        # Fig. 1c channels per resolution level (full, 1/2, 1/4, 1/8, 1/16). The figure is not in
        # the text; the paper builds "on top of the 3D UNet-style architecture [7]", whose
        # channels double at each down-sampling. Doubling from 16, the first-level width of the
        # 3D registration U-Nets (VoxelMorph; MDReg-Net), fits 16 patches of 64^3 per batch.
        "features": [16, 32, 64, 128, 256],
        # II-D: "a three-stage coarse-to-fine registration flow (N_r = 3)".
        "stages": 3,
        # Stage built for training: stages 1..train_stage, the earlier ones frozen (II-D: "For
        # training the current level of FCN, parameters of previous levels of FCNs are fixed").
        # The model saved after stage 3 (train_stage=3) is the full method.
        "train_stage": 1,
        # II-D: "Three decreasing alpha values (0.01, 0.005, 0.001 respectively) are set in these
        # three stages". With L = -alpha Lap + Id the first (largest) alpha is the smoothest; the
        # parenthesis of II-C ("the smaller of the alpha the more smoothness") says the reverse
        # and contradicts the coarse-to-fine order it describes, so the operator is taken as
        # written.
        "alphas": [0.01, 0.005, 0.001],
        # Grid spacing h of the Laplacian in alpha's unit: 1 = voxels (the paper's 1 mm grid).
        "spacing": 1.0,
        # Weight lam of eq. 3. The paper gives no lam but sets sigma = 0.001 in eq. 4, whose
        # gradient -K(dsim grad J) / (2 sigma^2) + v is the V-gradient of
        # (sim + sigma^2 ||Lv||^2) / (2 sigma^2): so lam = sigma^2 = 1e-6 (both terms as
        # means over voxels here, as they are both integrals over the patch in LDDMM). At this
        # weight the regulariser is nearly inactive; the smoothing of eq. 4 is `sobolev_gradient`.
        "lam": 1e-6,
        # II-D: "the length of the local volume used to compute the NCC is set to be 7".
        "ncc_window": 7,
        # Integration of the SVF: the paper uses a semi-Lagrangian scheme with an unstated N;
        # scaling and squaring with 7 steps here (CONVENTIONS; the paper's v is stationary).
        "int_steps": 7,
        # Eq. 4: back-propagate K dL/dv (see `SobolevGradient`).
        "sobolev_gradient": True,
        # II-D: 64^3 training patches; at test time "velocity field vectors only located in a
        # cubic (with the size of 32x32x32) at the center of each patch are considered"
        # (`mdregnet.patches`).
        "patch_size": 64,
        "patch_keep": 32,
        # Directory of the saved model of the previous stage (stages 1..train_stage-1 are copied
        # from it at build time; `load_earlier_stages`). None for stage 1.
        "init_from": None,
    }

    def build_model(self, input_shape, hp):
        ndims = len(input_shape)
        features = list(hp["features"])
        if len(features) != DEPTH + 1 or min(int(n) for n in features) < 1:
            raise ValueError(f"features needs {DEPTH + 1} positive channel counts (full to 1/16 "
                             f"resolution), got {features}")
        stages, k = int(hp["stages"]), int(hp["train_stage"])
        if stages < 1 or len(hp["alphas"]) != stages:
            raise ValueError(f"alphas needs one value per stage ({stages}), got {hp['alphas']}")
        if not 1 <= k <= stages:
            raise ValueError(f"train_stage must be in 1..{stages}, got {k}")
        if min(float(a) for a in hp["alphas"]) < 0 or not float(hp["spacing"]) > 0:
            raise ValueError(f"alphas must be >= 0 and spacing > 0, got {hp['alphas']}, "
                             f"{hp['spacing']}")
        patch, keep = int(hp["patch_size"]), int(hp["patch_keep"])
        if patch % self.divisor or not 1 <= keep <= patch or (patch - keep) % 2:
            raise ValueError(f"patch_size must be divisible by {self.divisor} and patch_keep in "
                             f"1..patch_size with an even difference, got {patch}, {keep}")
        if hp["init_from"] is not None and k == 1:
            raise ValueError("init_from loads the frozen earlier stages: it needs train_stage >= 2")

        moving = keras.Input((*input_shape, 1), name="moving")
        fixed = keras.Input((*input_shape, 1), name="fixed")
        outputs = {}
        current = moving
        disp = inverse = velocity = None
        for j in range(1, k + 1):
            net = stage_network(ndims, features, name=f"stage{j}")
            if j < k:
                net.trainable = False
            velocity = net([current, fixed])
            if j == k and hp["sobolev_gradient"]:
                velocity = SobolevGradient(hp["alphas"][j - 1], hp["spacing"],
                                           name="sobolev_gradient")(velocity)
            integrate = layers.VecInt(hp["int_steps"], name=f"integrate_stage{j}")
            u = integrate(velocity)
            u_inv = integrate(keras.layers.Rescaling(-1.0, name=f"negate_stage{j}")(velocity))
            outputs[f"velocity_stage{j}"] = velocity
            outputs[f"disp_stage{j}"] = u
            outputs[f"inverse_disp_stage{j}"] = u_inv
            if disp is None:
                disp, inverse = u, u_inv
            else:  # Phi_j = Phi_{j-1} o phi_j ; Phi_j^-1 = phi_j^-1 o Phi_{j-1}^-1
                disp = layers.ComposeTransform(name=f"compose_stage{j}")([u, disp])
                inverse = layers.ComposeTransform(name=f"compose_inverse_stage{j}")(
                    [inverse, u_inv])
            if j < k:
                current = layers.SpatialTransformer(name=f"warp_input_stage{j + 1}")(
                    [moving, disp])
        outputs["velocity"] = velocity
        outputs["disp"] = disp
        outputs["inverse_disp"] = inverse
        outputs["warped"] = layers.SpatialTransformer(name="warp")([moving, disp])
        model = keras.Model([moving, fixed], outputs, name="patch_fcn")
        if hp["init_from"] is not None:
            if os.path.isdir(hp["init_from"]):
                load_earlier_stages(model, hp["init_from"])
            else:  # a saved model being re-loaded elsewhere: its own weights hold every stage
                warnings.warn(f"patch_fcn: init_from {hp['init_from']!r} is not a directory; "
                              f"stages 1..{k - 1} keep their initial weights (fine when loading "
                              "a saved model or a checkpoint, NOT for training stage "
                              f"{k})", stacklevel=2)
        return model

    def build_objective(self, hp):
        k = int(hp["train_stage"])
        return PatchFCNObjective(alpha=hp["alphas"][k - 1], lam=hp["lam"],
                                 ncc_window=hp["ncc_window"], spacing=hp["spacing"])


class PatchFCNObjective:
    """Eq. 3 for the trained stage: `-NCC(F, M o Phi) + lam * ||L v||^2`.

    `NCC` is `losses.NCC(window)` (local squared NCC, window 7), `||L v||^2` is
    `losses.OperatorNorm(alpha)` of the trained stage's velocity 'velocity'. One-directional, as
    eq. 3 (`L_sim(M_i o phi_i^-1, F_i)`).

    Args:
        alpha: the trained stage's alpha; lam: weight of the operator term; ncc_window: NCC window
            per axis; spacing: grid spacing of L.

    Call arguments:
        moving: unused (the warped image is in `outputs`); fixed: `(B, *spatial, 1)`; outputs:
            the model's dict ('warped', 'velocity').

    Returns:
        `(total, terms)`: float32 scalar; terms 'sim' (-NCC) and 'operator' (`||L v||^2`).
    """

    bidirectional = False

    def __init__(self, alpha, lam, ncc_window=7, spacing=1.0):
        self.lam = float(lam)
        self.similarity = losses.NCC(window=ncc_window)
        self.regulariser = losses.OperatorNorm(alpha=alpha, spacing=spacing)

    def __call__(self, moving, fixed, outputs):
        del moving
        sim = self.similarity(fixed, outputs["warped"])
        reg = self.regulariser(None, outputs["velocity"])
        return tf.cast(sim + self.lam * reg, tf.float32), {"sim": sim, "operator": reg}


__all__ = ["PAPER_TRAINING", "PatchFCN", "PatchFCNObjective", "SobolevGradient",
           "TrilinearUpsample", "apply_kernel", "load_earlier_stages", "stage_network",
           "stage_networks", "sobolev_identity"]
