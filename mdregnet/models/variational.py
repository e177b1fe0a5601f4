"""Variational Jacobian learning: a network trained by a variational loss with det control.

Theljani & Chen, J. Algorithms Comput. Technol. 2020, doi:10.1177/1748302620973528
(`../shared/papers/variational-jacobian-learning.md`, which keeps the prose but not the displayed
equations nor the layer figures). The network is ordinary; what makes the
map fold-free is the loss: "the diffeomorphisms are guaranteed by using a suitable loss function
for training that controls the folding in the deformations", "without adding any extra layer to
the neural network or enforcing it compute a deformation and its inverse".

Registered methods (the paper's two networks, section "Registration network"):

    "vjl_sn"     SN, "a small network ... which contains four blocks containing different kernels
                 with different sizes and ReLU activation is used at the end of each block";
    "vjl_lunet"  LU-Net, "a light version of U-net network"; the paper's recommendation
                 ("We found that LU-net is recommended").

Both take `[moving T, fixed R]` concatenated "as a single multichannel image" and end with "a
final layer that produces the deformation" (Fig. 1): a linear convolution to an `ndims`-channel
DISPLACEMENT `u` in voxels ("outputs a 2-channel map representing the 2D deformation field"),
used directly as `phi(p) = p + u(p)`: no velocity field, no integration, no inverse (the paper
adds no such layer). The registry's `diffeomorphic` flag, which promises 'inverse_disp' and
'velocity' outputs, is therefore False; invertibility is what the Jacobian term trains for.

Architectures. The stored text keeps the sentences above but not the figures that draw the two
networks (Figure 2 for SN, the LU-net figure), so channel counts and kernel sizes are choices,
all hyper-parameters:

    SN (full resolution, divisor 1):
        for (f, k) in zip(sn_features, sn_kernels):   Conv k^d, f filters, 'same' -> ReLU
        output: Conv 3^d -> ndims, linear                                  (the displacement)
      defaults: features [16, 32, 32, 16], kernels [7, 5, 3, 3] (four blocks, decreasing sizes).
    LU-Net (U-Net of Ronneberger et al. 2015 with fewer levels and channels, divisor 8):
        level i (i < L-1): [Conv 3^d, f_i -> ReLU] x 2, skip, MaxPool 2
        bottleneck:        [Conv 3^d, f_{L-1} -> ReLU] x 2
        up level i:        ConvTranspose 2^d stride 2, f_i (linear, U-Net's "up-convolution"),
                           concatenate skip i, [Conv 3^d, f_i -> ReLU] x 2
        output: Conv 1^d -> ndims, linear (U-Net's final 1x1 convolution)
      default lunet_features [16, 32, 64, 128]: U-Net's 64..1024 over 5 levels, a quarter of
      the channels on 4 levels (3 poolings).
    The output kernels start at N(0, 1e-5) with zero bias (VoxelMorph's choice; the paper is
    silent), so training starts from the identity map.

Objective, the loss (2): `L = S(T o phi, R) + lam * R(u)` with

    S    `similarity`: "cc" (alias "mono", `losses.GlobalCC`, 1 - rho^2: section "Measuring
         similarity for mono-modal images") or "pls" (alias "multi", `losses.PLS`: section
         "Parallel level set measure"), by default normalised to [0, 1) like 1 - rho^2 so
         that the same lam serves both ("by only changing the similarity measure");
         "ngf" (`losses.NGF`) is offered as the alternative multi-modal measure the paper cites;
    R    `losses.VariationalRegulariser(alpha_grad, alpha_hess, alpha_jac, jac_eps)`: first-
         and second-order smoothing plus the determinant hinge (section "Regularisation");
    lam  60 ("In the rest of the numerical examples, we consider lambda = 60").
The text does not give the relative weights inside R, nor the units of its domain (its terms
here are means over the grid in voxel units), so lam = 60 is the paper's number on our scale,
not a verified equivalent. Measured on two OASIS slices at 80x96 (SN, "cc", Adam 1e-3, 150
steps): lam = 60 keeps the field under 1 voxel (Dice 0.438 -> 0.439); lam = 1 reaches Dice 0.570
with no folded voxel; lam = 0.1 Dice 0.579 with 0.6% folded; lam = 0 folds 7.6%. So on this scale
the paper's value acts as a near-rigid constraint; lam ~ 1 is where the Jacobian control and the
smoothing balance the similarity. Terms logged: 'sim', 'diffusion', 'bending', 'jacobian', 'reg'.

Output keys: 'warped' `(B, *spatial, 1)` moving image warped by 'disp' (linear, 0 outside);
'disp' `(B, *spatial, ndims)` displacement in voxels (fixed space).
"""

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models.registry import Method, register

#: `similarity` hyper-parameter values -> loss class (aliases name the modality)
SIMILARITIES = {"cc": losses.GlobalCC, "mono": losses.GlobalCC, "pls": losses.PLS,
                "multi": losses.PLS, "ngf": losses.NGF}

#: Objective defaults shared by both networks (see the module docstring for their sources).
OBJECTIVE_DEFAULTS = {
    "similarity": "cc",   # mono-modal; "pls" (or "multi") for multi-modal pairs
    "lam": 60.0,          # "we consider lambda = 60"
    "alpha_grad": 1.0,    # weights inside R: not in the stored text
    "alpha_hess": 1.0,
    "alpha_jac": 1.0,
    "jac_eps": 0.1,       # det margin of the hinge, so that det <= 0 is always penalised
    "cc_eps": 1e-8,
    "pls_eps": 0.01,      # intensity per voxel, for images in [0, 1]
    "pls_normalise": True,  # dimensionless PLS in [0, 1), on the scale of 1 - rho^2
    "ngf_eps": 0.01,
}


def _conv(x, filters, kernel_size, name, activation="relu"):
    """`ndims`-D 'same' convolution, optionally followed by ReLU."""
    ndims = len(x.shape) - 2
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    x = layer(filters, kernel_size, padding="same", name=name)(x)
    if activation == "relu":
        x = keras.layers.ReLU(name=name + "_relu")(x)
    return x


def _displacement_head(x, ndims, kernel_size, name="disp"):
    """The final linear layer "that produces the deformation": `ndims` channels, voxels."""
    layer = keras.layers.Conv3D if ndims == 3 else keras.layers.Conv2D
    return layer(ndims, kernel_size, padding="same", name=name,
                 kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5),
                 bias_initializer="zeros")(x)


def small_network(x, features, kernels):
    """SN: four (by default) full-resolution blocks Conv k^d -> ReLU.

    Args:
        x: `(B, *spatial, 2)` [moving, fixed].
        features, kernels: filters and kernel size of each block.

    Returns:
        `(B, *spatial, features[-1])` features.
    """
    for i, (filters, size) in enumerate(zip(features, kernels)):
        x = _conv(x, int(filters), int(size), name=f"block{i}")
    return x


def light_unet(x, features):
    """LU-Net: U-Net with `len(features)` levels, two 3^d Conv-ReLU per level, 2x max pooling,
    2^d stride-2 transposed convolutions and skip concatenations.

    Args:
        x: `(B, *spatial, 2)` [moving, fixed]; sizes divisible by `2 ** (len(features) - 1)`.
        features: filters per level, finest first (the last is the bottleneck).

    Returns:
        `(B, *spatial, features[0])` features at full resolution.
    """
    ndims = len(x.shape) - 2
    pool = keras.layers.MaxPooling3D if ndims == 3 else keras.layers.MaxPooling2D
    up = keras.layers.Conv3DTranspose if ndims == 3 else keras.layers.Conv2DTranspose
    skips = []
    for i, filters in enumerate(features[:-1]):
        x = _conv(x, filters, 3, name=f"enc{i}a")
        x = _conv(x, filters, 3, name=f"enc{i}b")
        skips.append(x)
        x = pool(2, name=f"pool{i}")(x)
    x = _conv(x, features[-1], 3, name="bottleneck_a")
    x = _conv(x, features[-1], 3, name="bottleneck_b")
    for i in reversed(range(len(features) - 1)):
        x = up(features[i], 2, strides=2, padding="same", name=f"upconv{i}")(x)
        x = keras.layers.Concatenate(name=f"skip{i}")([x, skips[i]])
        x = _conv(x, features[i], 3, name=f"dec{i}a")
        x = _conv(x, features[i], 3, name=f"dec{i}b")
    return x


def _check_objective_hparams(hp):
    if hp["similarity"] not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {sorted(SIMILARITIES)}; got "
                         f"{hp['similarity']!r}")
    if hp["lam"] < 0:
        raise ValueError(f"lam must be >= 0; got {hp['lam']}")


class _VariationalMethod(Method):
    """Shared model wrapper and objective of the two networks."""

    diffeomorphic = False  # no velocity / inverse outputs; fold-free maps come from the loss
    defaults = dict(OBJECTIVE_DEFAULTS)

    def features(self, pair, hp):
        raise NotImplementedError

    def head_kernel(self):
        return 3

    def build_model(self, input_shape, hp):
        _check_objective_hparams(hp)
        ndims = len(input_shape)
        moving = keras.Input((*input_shape, 1), name="moving")
        fixed = keras.Input((*input_shape, 1), name="fixed")
        pair = keras.layers.Concatenate(name="input_pair")([moving, fixed])
        disp = _displacement_head(self.features(pair, hp), ndims, self.head_kernel())
        warped = layers.SpatialTransformer(name="warp")([moving, disp])
        return keras.Model([moving, fixed], {"warped": warped, "disp": disp}, name=self.name)

    def build_objective(self, hp):
        _check_objective_hparams(hp)
        return VariationalObjective(hp)


@register("vjl_sn")
class VJLSmallNetwork(_VariationalMethod):
    """SN of Theljani & Chen: four Conv-ReLU blocks of decreasing kernel size, full resolution."""

    divisor = 1
    defaults = dict(OBJECTIVE_DEFAULTS, sn_features=[16, 32, 32, 16], sn_kernels=[7, 5, 3, 3])

    def features(self, pair, hp):
        if len(hp["sn_features"]) != len(hp["sn_kernels"]) or not hp["sn_features"]:
            raise ValueError("sn_features and sn_kernels need the same, nonzero length; got "
                             f"{hp['sn_features']} and {hp['sn_kernels']}")
        return small_network(pair, hp["sn_features"], hp["sn_kernels"])


@register("vjl_lunet")
class VJLLightUNet(_VariationalMethod):
    """LU-Net of Theljani & Chen: a 4-level U-Net with a quarter of U-Net's channels."""

    divisor = 8  # three 2x poolings with the default four levels
    defaults = dict(OBJECTIVE_DEFAULTS, lunet_features=[16, 32, 64, 128])

    def head_kernel(self):
        return 1

    def features(self, pair, hp):
        feats = [int(f) for f in hp["lunet_features"]]
        if len(feats) < 2:
            raise ValueError(f"lunet_features needs at least 2 levels; got {feats}")
        factor = 2 ** (len(feats) - 1)
        spatial = pair.shape[1:-1]
        if any(n % factor for n in spatial):
            raise ValueError(f"vjl_lunet with {len(feats)} levels needs spatial sizes divisible "
                             f"by {factor}, got {tuple(spatial)}; pad or crop first "
                             "(mdregnet.preprocess)")
        return light_unet(pair, feats)


class VariationalObjective:
    """`S(R, T o phi) + lam * (alpha_grad D(u) + alpha_hess B(u) + alpha_jac J(u))`, loss (2).

    Args:
        hp: the method's hyper-parameters (see `OBJECTIVE_DEFAULTS`).

    Call arguments:
        moving, fixed: `(B, *spatial, 1)` images (moving unused: the warped image carries it).
        outputs: the model's dict with 'warped' and 'disp'.

    Returns:
        `(total, terms)`: float32 scalar and dict 'sim', 'diffusion', 'bending', 'jacobian'
        (unweighted) and 'reg' (the weighted sum R, before lam).
    """

    def __init__(self, hp):
        key = hp["similarity"]
        cls = SIMILARITIES[key]
        eps = {losses.GlobalCC: hp["cc_eps"], losses.PLS: hp["pls_eps"],
               losses.NGF: hp["ngf_eps"]}[cls]
        if cls is losses.PLS:
            self.similarity = cls(eps=eps, normalise=hp["pls_normalise"])
        else:
            self.similarity = cls(eps=eps)
        self.lam = float(hp["lam"])
        self.regulariser = losses.VariationalRegulariser(
            alpha_grad=hp["alpha_grad"], alpha_hess=hp["alpha_hess"],
            alpha_jac=hp["alpha_jac"], jac_eps=hp["jac_eps"])

    def __call__(self, moving, fixed, outputs):
        del moving
        sim = self.similarity(fixed, outputs["warped"])
        terms = self.regulariser.terms(outputs["disp"])
        reg = (self.regulariser.alpha_grad * terms["diffusion"]
               + self.regulariser.alpha_hess * terms["bending"]
               + self.regulariser.alpha_jac * terms["jacobian"])
        total = tf.cast(sim + self.lam * reg, tf.float32)
        return total, {"sim": sim, **terms, "reg": reg}
