"""VoxelMorph with the PRDFE module, and the two ablations of the paper (PDFE, IPRDFE).

Zhou, Pang, Cheng, Sun, Wu, Zhao, Liu, Lu, Yang & Feng, "Unsupervised deformable medical image
registration via pyramidal residual deformation fields estimation" (`../shared/papers/prdfe.md`).

Registered names (all displacement models: no SVF is integrated, so `diffeomorphic = False`):

- `prdfe`  -- VoxelMorph with PRDFE (the paper's method): a shared-weight pyramidal feature
  descriptor `FE_k` (Sec. II-A), feature warping by the total field `phi_k` (Sec. II-B, eq. 1), a
  residual field `phi_residual^k = G_k(FE_k(I_f), FE_k(I_m) o phi_k)` per level (eq. 2), and the
  total field as the magnitude-weighted sum of all coarser residuals (eqs. 3-4).
- `pdfe`   -- "pyramidal deformation field estimation without 'residual' module" (Sec. III-C):
  the same descriptor and feature warping, but `G_k` estimates the TOTAL field of level k, which is
  up-sampled to warp the next level's moving features and, at level 1, is the output. This is the
  design the paper attributes to the Dual-Stream Pyramid Registration Network [26] (Sec. I).
- `iprdfe` -- "Image Pyramidal Residual DFE": as `prdfe` with the learned descriptor replaced by
  an image pyramid (`FE_k(I)` = the image average-pooled `k - 1` times).

Levels use the paper's numbering: k = 1 is full resolution, k = K the coarsest, 2^(K-1) times
smaller (K = 5 for the brain setting: the four stride-2 stages of VoxelMorph-2, so eq. 4 reaches
`up_16`). Input sizes must be divisible by `divisor = 2^(K-1) = 16`.

Reading of eqs. 3-4 and the scaling. In the paper `up_s` is plain interpolation and the factor
`2^(j-1)` is the magnitude correction ("the magnitude of down_2 deformation field should be
doubled ..."). In mdregnet, resizing a field by `s` interpolates AND multiplies by `s`
(CONVENTIONS.md; `layers.RescaleTransform`), so `2^(j-1) x up_{2^(j-1)}` is ONE
`RescaleTransform(2^(j-1))`; the factor is not applied a second time. Eq. 4 is then

    phi_final = sum_{j=1..K} RescaleTransform(2^(j-1))(phi_residual^j)          (full-res voxels)

and eq. 3 (whose printed indices are garbled: it sums `phi_residual^k` over j, and its text says
j = 1..k-1 while eq. 4 numbers levels fine to coarse) is read as the same sum restricted to the
levels coarser than k, brought to level k's grid:

    phi_k = sum_{j=k+1..K} RescaleTransform(2^(j-k))(phi_residual^j)            (level-k voxels)

with `phi_K = 0` (nothing to warp with at the coarsest level). Each residual is resampled in ONE
step to the target grid (`up_16` in eq. 4, not four `up_2`), and the fields are summed, not
composed, as the paper writes.

Network (paper, Sec. III-D, brain data): encoder channels [24, 40, 40, 40], decoder channels
[40, 40, 40, 40, 40, 24, 24], built on "the CVPR-version code in VoxelMorph-2 with MSE loss". The
decoder convolutions are assigned to levels as in VoxelMorph-2's U-Net: one conv at each of the
levels K..3, two at level 2 (1/2 resolution), the remaining ones at level 1 (full resolution), each
level's block followed by its own 3^d flow head (VoxelMorph's init N(0, 1e-5)); the level-1
"features" are the images themselves (VoxelMorph's full-resolution skip). Convolutions are 3^d with
LeakyReLU(0.2) as VoxelMorph's.

Loss (eq. 5): `MSE(I_f, I_m o phi_final) + lam * Grad_l2(phi_final)`, lam = 0.001 for brain data
("all registration methods chose a regularization of 0.001"). Eq. 5 writes the gradient term as a
sum over voxels; we use the mean (`losses.Grad`), the convention of the VoxelMorph code the paper
ran with its default settings, for which lam = 0.001 was chosen. The simulated-data lambdas (best
image MSE, Sec. IV-A) were 0.05 (PRDFE), 0.01 (IPRDFE), 0.001 (PDFE and VoxelMorph).

Training settings of the paper (not model hyper-parameters, see `PAPER_TRAINING`): Adam, lr 1e-4,
mini-batch 4; brain volumes cropped to 160x192x224 and resized to 120x144x160 for training.

Output keys: 'warped' `(B, *spatial, 1)`; 'disp' `(B, *spatial, ndims)` full-resolution
displacement in voxels (`phi_final`); 'flow_level{k}' `(B, *spatial / 2^(k-1), ndims)` for
k = 1..K, the output of `G_k` in voxels of level k (the residual for prdfe/iprdfe, the total
field for pdfe); 'total_level{k}' for k = 1..K-1, the field `phi_k` that warped level k's moving
features (level-k voxels).
"""

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models import blocks
from mdregnet.models.registry import Method, register

#: Training settings of the paper (Sec. III-D), for the training entry point and experiments.
PAPER_TRAINING = {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 4}

_DOWNSAMPLE = ("maxpool", "stride")

# Shared by all three variants; each variant adds its own keys.
_COMMON_DEFAULTS = {
    # Sec. III-D, brain data: [40, 40, 40, 40, 40, 24, 24] decoder channels (VoxelMorph-2 layout).
    "dec_features": [40, 40, 40, 40, 40, 24, 24],
    # Eq. 2: G_k sees only [FE_k(I_f), FE_k(I_m) o phi_k] (the text says so three times). True
    # keeps VoxelMorph's U-Net decoder path as well: G_k also gets G_{k+1}'s last features,
    # x2 nearest up-sampled (as VoxelMorph's decoder and PWC-Net-style estimators do).
    "decoder_context": False,
    # Flow heads ~ N(0, stddev): the paper is silent; VoxelMorph's 1e-5 (start from identity).
    "flow_init_stddev": 1e-5,
    # Eq. 5: MSE + lam * l2 gradient of phi_final; lam = 0.001 for brain data (Sec. III-D).
    "lam": 0.001,
    "penalty": "l2",
}


def decoder_layout(dec_features, levels):
    """Assigns the VoxelMorph-2 decoder convolutions to pyramid levels.

    Args:
        dec_features: list of filters, at least `levels + 1` long (7 for K = 5).
        levels: K, the number of pyramid levels (level 1 = full resolution).

    Returns:
        dict level k -> list of filters of the convs of `G_k`: one conv at each of the levels
        K..3, two at level 2, the rest at level 1 (VoxelMorph-2: [1, 1, 1, 2, 2] for K = 5).

    Raises:
        ValueError: too few decoder entries.
    """
    dec = [int(f) for f in dec_features]
    if levels < 2:
        raise ValueError(f"the pyramid needs at least 2 levels, got {levels}")
    if len(dec) < levels + 1:
        raise ValueError(f"dec_features needs at least {levels + 1} entries for {levels} levels "
                         f"(one conv per level K..3, two at level 2, >= 1 at level 1), got {dec}")
    layout = {}
    for i, k in enumerate(range(levels, 2, -1)):
        layout[k] = [dec[i]]
    layout[2] = dec[levels - 2:levels]
    layout[1] = dec[levels:]
    return layout


def feature_descriptor(input_shape, enc_features, downsample="maxpool", name="descriptor"):
    """Shared-weight pyramidal feature descriptor `FE_k`, k = 2..K (paper Sec. II-A, Fig. 2).

    `FE_k(I)` is made from `FE_{k-1}(I)` (with `FE_1(I) = I`) by a 3^d convolution with
    `enc_features[k-2]` filters and LeakyReLU(0.2), down-sampled by 2: "cascaded convolution and
    pooling layers by a downsample factor of 2" (default 'maxpool': stride-1 conv then 2^d max
    pooling), or 'stride' (one stride-2 conv, as VoxelMorph-2's encoder). Same parameter count.

    Args:
        input_shape: spatial size `(X, Y[, Z])`.
        enc_features: filters per level, `[24, 40, 40, 40]` for brain data.
        downsample: 'maxpool' or 'stride'.

    Returns:
        `keras.Model` mapping an image `(B, *spatial, 1)` to the list `[FE_2, ..., FE_K]`, FE_k of
        shape `(B, *spatial / 2^(k-1), enc_features[k-2])`. Call it on both images to share
        weights.
    """
    if downsample not in _DOWNSAMPLE:
        raise ValueError(f"downsample must be one of {_DOWNSAMPLE}, got {downsample!r}")
    ndims = len(input_shape)
    pool = keras.layers.MaxPooling3D if ndims == 3 else keras.layers.MaxPooling2D
    image = keras.Input((*input_shape, 1), name=f"{name}_image")
    h = image
    features = []
    for i, filters in enumerate(enc_features):
        k = i + 2
        if downsample == "stride":
            h = blocks.conv(h, int(filters), strides=2, name=f"fe{k}_conv")
        else:
            h = blocks.conv(h, int(filters), name=f"fe{k}_conv")
            h = pool(2, name=f"fe{k}_pool")(h)
        features.append(h)
    return keras.Model(image, features, name=name)


def _sum(tensors, name):
    return tensors[0] if len(tensors) == 1 else keras.layers.Add(name=name)(tensors)


def build_pyramid_network(input_shape, hp, pyramid, residual, name):
    """Builds VoxelMorph with a P(R)DFE module (eqs. 1-4), 2D or 3D.

    Args:
        input_shape: spatial size, each divisible by `2^(K-1)`.
        hp: hyper-parameters (see the registered classes' `defaults`).
        pyramid: 'features' (learned shared-weight descriptor, prdfe/pdfe) or 'image'
            (average-pooled image pyramid, iprdfe).
        residual: True: `G_k` estimates residual fields accumulated by eqs. 3-4 (prdfe, iprdfe);
            False: `G_k` estimates the total field of level k (pdfe).
        name: model name.

    Returns:
        `keras.Model` called as `model([moving, fixed])` on `(B, *spatial, 1)` float32 tensors,
        returning the dict described in the module docstring.
    """
    ndims = len(input_shape)
    moving = keras.Input((*input_shape, 1), name="moving")
    fixed = keras.Input((*input_shape, 1), name="fixed")

    if pyramid == "features":
        enc = list(hp["enc_features"])
        levels = len(enc) + 1
        layout = decoder_layout(hp["dec_features"], levels)
        descriptor = feature_descriptor(input_shape, enc, hp["downsample"])
        feats_m = [moving] + list(descriptor(moving))
        feats_f = [fixed] + list(descriptor(fixed))
    elif pyramid == "image":
        levels = len(hp["dec_features"]) - 2
        layout = decoder_layout(hp["dec_features"], levels)
        size = int(hp["image_pool_size"])
        avg = keras.layers.AveragePooling3D if ndims == 3 else keras.layers.AveragePooling2D
        feats_m, feats_f = [moving], [fixed]
        for k in range(2, levels + 1):
            # Same (weightless) pooling for both images; 'same' padding never pads here because
            # the sizes are divisible by 2^(K-1).
            pool = avg(size, strides=2, padding="same", name=f"image_pool{k}")
            feats_m.append(pool(feats_m[-1]))
            feats_f.append(pool(feats_f[-1]))
    else:
        raise ValueError(f"pyramid must be 'features' or 'image', got {pyramid!r}")

    factor = 2 ** (levels - 1)
    if any(n % factor for n in input_shape):
        raise ValueError(f"{levels} pyramid levels need spatial sizes divisible by {factor}, got "
                         f"{tuple(input_shape)}")

    outputs = {}
    flows = {}  # k -> output of G_k, level-k voxels
    context = None
    for k in range(levels, 0, -1):
        if k == levels:
            warped_m = feats_m[k - 1]  # phi_K = 0: nothing estimated yet
        else:
            if residual:
                # Eq. 3: phi_k = sum_{j>k} 2^(j-k) up_{2^(j-k)}(phi_residual^j), one resample each.
                terms = [layers.RescaleTransform(2 ** (j - k), name=f"res{j}_to_level{k}")(flows[j])
                         for j in range(k + 1, levels + 1)]
                total = _sum(terms, name=f"total_level{k}")
            else:
                total = layers.RescaleTransform(2, name=f"flow{k + 1}_up")(flows[k + 1])
                if not hp["scale_magnitude"]:
                    # Size only, magnitude not doubled (the practice of [26] as the paper says).
                    total = keras.layers.Rescaling(0.5, name=f"flow{k + 1}_unscale")(total)
            outputs[f"total_level{k}"] = total
            # Eq. 1: warp the moving features of level k by phi_k (linear, 0 outside).
            warped_m = layers.SpatialTransformer(name=f"warp_fe{k}")([feats_m[k - 1], total])
        # Eq. 2: G_k on the concatenated fixed and warped moving features.
        parts = [feats_f[k - 1], warped_m]
        if hp["decoder_context"] and context is not None:
            parts = [blocks.upsample(context, name=f"g{k}_context_up")] + parts
        x = keras.layers.Concatenate(name=f"g{k}_input")(parts)
        for i, filters in enumerate(layout[k]):
            x = blocks.conv(x, filters, name=f"g{k}_conv{i}")
        context = x
        flows[k] = blocks.flow_head(x, ndims, stddev=float(hp["flow_init_stddev"]),
                                    name=f"g{k}_flow")
        outputs[f"flow_level{k}"] = flows[k]

    if residual:
        # Eq. 4: phi_final = sum_j 2^(j-1) up_{2^(j-1)}(phi_residual^j), full-resolution voxels.
        terms = [flows[1]]
        for j in range(2, levels + 1):
            terms.append(layers.RescaleTransform(2 ** (j - 1), name=f"res{j}_to_full")(flows[j]))
        disp = _sum(terms, name="phi_final")
    else:
        disp = flows[1]
    outputs["disp"] = disp
    outputs["warped"] = layers.SpatialTransformer(name="warp")([moving, disp])
    return keras.Model([moving, fixed], outputs, name=name)


class PRDFEObjective:
    """Eq. 5: `MSE(I_f, I_m o phi_final) + lam * Grad(phi_final)`.

    Args:
        lam: regularisation weight (0.001 for brain data).
        penalty: 'l2' (eq. 5) or 'l1'.

    Call arguments:
        moving, fixed: `(B, *spatial, 1)` images (moving unused: the loss compares with fixed).
        outputs: the model's dict ('warped', 'disp').

    Returns:
        `(total, terms)`: float32 scalar and {'sim': MSE, 'grad': gradient penalty}.
    """

    def __init__(self, lam, penalty="l2"):
        self.lam = float(lam)
        self.similarity = losses.MSE()
        self.regulariser = losses.Grad(penalty)

    def __call__(self, moving, fixed, outputs):
        del moving
        sim = self.similarity(fixed, outputs["warped"])
        grad = self.regulariser(None, outputs["disp"])
        total = tf.cast(sim + self.lam * grad, tf.float32)
        return total, {"sim": sim, "grad": grad}


class _PyramidMethod(Method):
    diffeomorphic = False  # displacement model: phi_final is a sum of displacement fields
    divisor = 16  # 2^(K-1) with K = 5 levels (eq. 4 reaches up_16)
    pyramid = "features"
    residual = True

    def build_model(self, input_shape, hp):
        return build_pyramid_network(input_shape, hp, self.pyramid, self.residual, self.name)

    def build_objective(self, hp):
        return PRDFEObjective(hp["lam"], hp["penalty"])


_FEATURE_DEFAULTS = {
    # Sec. III-D, brain data: [24, 40, 40, 40] encoding channels -> FE_2..FE_5 (1/2 .. 1/16).
    "enc_features": [24, 40, 40, 40],
    # Sec. II-A says "convolution and pooling"; the VoxelMorph-2 code it was built on uses
    # stride-2 convs ('stride'). Both have the same parameters; max pooling follows the text.
    "downsample": "maxpool",
}


@register("prdfe")
class PRDFE(_PyramidMethod):
    """VoxelMorph with the PRDFE module (the paper's method; eqs. 1-5).

    Defaults: brain-data setting of Sec. III-D (channels, lam = 0.001). Outputs and the reading of
    eqs. 3-4 are documented in the module docstring.
    """

    defaults = {**_FEATURE_DEFAULTS, **_COMMON_DEFAULTS}


@register("pdfe")
class PDFE(_PyramidMethod):
    """Ablation "VoxelMorph with PDFE": learned pyramid and feature warping, no residual fields.

    `G_k` outputs the total field of level k; it is brought to level k-1 by `RescaleTransform(2)`
    (size and magnitude doubled; `scale_magnitude=False` doubles the size only, the practice the
    paper criticises in [26] -- the paper does not say which PDFE used) to warp that level's moving
    features; `disp` is level 1's output.
    """

    residual = False
    defaults = {**_FEATURE_DEFAULTS, **_COMMON_DEFAULTS, "scale_magnitude": True}


@register("iprdfe")
class IPRDFE(_PyramidMethod):
    """Ablation "VoxelMorph with IPRDFE": PRDFE with an image pyramid instead of learned features.

    `FE_k(I)` is `I` average-pooled `k - 1` times with a `image_pool_size`^d window, stride 2. The
    paper does not say how its image pyramid was made; 2^d average pooling puts coarse voxel `i`
    at fine `2i + 0.5`, exactly where `RescaleTransform` assumes it. K = len(dec_features) - 2.
    """

    pyramid = "image"
    defaults = {**_COMMON_DEFAULTS, "image_pool_size": 2}
