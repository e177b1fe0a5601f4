"""MDReg-Net: multi-resolution diffeomorphic registration with deep self-supervision.

Zhuo & Fan, "Multi-resolution diffeomorphic image registration with deep self-supervision"
(`../shared/papers/mdregnet.md`). Sections: Methods (eqs. 2-3), Network Architecture, Network
Training. The numbers below are the paper's; every choice the paper leaves open is a
hyper-parameter with a comment saying what was chosen and why.

Data flow (L = 3 levels, l = 1 coarsest, as in the paper):

    S_l([I_m o Phi(v~^{l-1}) at full resolution, I_f])  ->  v^l  at 1/8, 1/4, 1/2 resolution
    v~^l = up2(v~^{l-1}) + v^l         (accumulated SVF, resized WITH magnitude scaling)
    Phi(v~^l) = exp(v~^l)              (scaling and squaring, 7 steps, on level l's grid)
    final: v = up2(v~^3) at full resolution; Gaussian smoothing (sigma 1.732, 3x3x3) of the
           deformation (default) or of the velocity; disp = exp(v) - id, inverse_disp = exp(-v) - id
    opt-in (`int_downsize=2`, not the paper's): v = v~^3 is integrated on its own 1/2 grid and
           the displacements are resized to full resolution (magnitude scaled) before the
           deformation smoothing, as VoxelMorph's `int_downsize=2` does: 8x fewer voxels to
           integrate (at 176x192x176 on 2 CPU cores: training step 7.9 -> 4.0 s, its peak
           memory 8.8 -> 5.9 GiB, inference 0.72 -> 0.70 s; experiments/results/
           benchmark_cpu.md); the warps of the images stay at full resolution.

Output keys. Level keys use the paper's index l (1 = coarsest):
    'warped', 'warped_fixed'     (B, *spatial, 1): I_m o Phi, I_f o Phi^-  (full resolution)
    'disp', 'inverse_disp'       (B, *spatial, ndims) voxels: final forward/inverse displacement
    'velocity'                   (B, *spatial / int_downsize, ndims) voxels of its grid: the SVF
                                 that is integrated (full resolution by default)
    'velocity_level{l}'          (B, *spatial / 2^(4-l), ndims): incremental SVF v^l (regularised)
    'warped_level{l}', 'warped_fixed_level{l}', for l < L: the pooled images I_m^l, I_f^l warped on
                                 level l's grid by Phi(v~^l), Phi^-(v~^l) (deep self-supervision)
The level-L term of the loss uses the full-resolution images and the final (smoothed) transform:
"the original image serves as the image at the finest (full) resolution" and "the accumulated
velocity fields v~^L ... are utilized to obtain the deformation field at the finest resolution".
"""

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models import blocks
from mdregnet.models.blocks import FLOAT32 as F32
from mdregnet.models.registry import Method, register

_SMOOTHING = ("deformation", "velocity", "none")


def subnetwork(x, level, enc_features, dec_features, head_features, name):
    """U-Net sub-network S_l of MDReg-Net (Fig. 1b).

    Encoder: one 3^d conv with `enc_features[0]` (16) filters then three with `enc_features[1:]`
    (32), all stride 2 (1/16 resolution). Decoder: `level` transposed convs (32 filters, stride 2),
    each followed by concatenation with the encoder features of the same resolution (U-Net skip),
    then convs with `head_features` (32, 16) filters and an output conv with ndims channels.
    LeakyReLU everywhere except the output layer.

    Args:
        x: `(B, *spatial, 2)` Keras tensor [warped moving, fixed] at full resolution.
        level: l in 1..len(enc_features)-1; the SVF comes out at 1 / 2**(len(enc) - l).

    Returns:
        `(B, *spatial / 2**(len(enc) - l), ndims)` incremental SVF v^l in voxels of its grid.
    """
    ndims = len(x.shape) - 2
    skips = []
    h = x
    for i, filters in enumerate(enc_features):
        h = blocks.conv(h, filters, strides=2, name=f"{name}_enc{i}")
        skips.append(h)
    skips.pop()  # the bottleneck itself is not a skip
    for i in range(level):
        h = blocks.deconv(h, dec_features, strides=2, name=f"{name}_dec{i}")
        h = keras.layers.Concatenate(name=f"{name}_skip{i}")([h, skips.pop()])
    for i, filters in enumerate(head_features):
        h = blocks.conv(h, filters, name=f"{name}_head{i}")
    return blocks.flow_head(h, ndims, name=f"{name}_svf")


@register("mdregnet")
class MDRegNet(Method):
    """MDReg-Net (seed paper). See the module docstring for the data flow and output keys."""

    diffeomorphic = True
    divisor = 16  # four stride-2 convolutions in every sub-network encoder
    defaults = {
        # Network Architecture: encoder 16, 32, 32, 32 (stride 2); 32-filter deconvs; 32, 16 convs.
        "enc_features": [16, 32, 32, 32],
        "dec_features": 32,
        "head_features": [32, 16],
        "levels": 3,  # S1..S3: SVFs at 1/8, 1/4, 1/2 resolution
        "int_steps": 7,  # scaling and squaring steps (paper, after Dalca et al. 2019)
        # Grid of the final integration, 1 / int_downsize of the input: 1 is the paper (SVF
        # interpolated to full resolution, then integrated); 2 integrates the 1/2-resolution
        # SVF and resizes the displacement (VoxelMorph's default), a speed option (#5).
        "int_downsize": 1,
        # Spatial smoothing layer: sigma 1.732 voxels, 3x3x3 (ANTs' default), at full resolution.
        # The text says it smooths "the deformation fields at the finest resolution ... as used in
        # ANTs": default 'deformation' (the integrated displacement, forward and inverse each);
        # 'velocity' smooths the SVF before integration (on its grid) instead; 'none' is the
        # paper's ablation without the layer (then lam 0.5 or 1.0, Table 3).
        "smoothing": "deformation",
        "smooth_sigma": 1.732,
        "smooth_kernel": 3,
        # Loss (eq. 3): bidirectional local NCC at every level + lam * sum_l ||grad v^l||_1.
        "lam": 0.35,
        # Window of the local NCC: the paper is silent; 9 per axis as VoxelMorph's NCC.
        "ncc_window": 9,
        "bidirectional": True,
        # Weight of each level's similarity term, coarse to fine: the paper sums them unweighted.
        "level_weights": [1.0, 1.0, 1.0],
    }

    def build_model(self, input_shape, hp):
        if hp["smoothing"] not in _SMOOTHING:
            raise ValueError(f"smoothing must be one of {_SMOOTHING}, got {hp['smoothing']!r}")
        enc = list(hp["enc_features"])
        n_levels = int(hp["levels"])
        if not 1 <= n_levels <= len(enc) - 1:
            raise ValueError(f"levels must be in 1..{len(enc) - 1} for {len(enc)} encoder convs")
        ndims = len(input_shape)
        moving = keras.Input((*input_shape, 1), name="moving")
        fixed = keras.Input((*input_shape, 1), name="fixed")
        depth = len(enc)
        pyramid = layers.AvgPoolPyramid(depth, **F32, name="pyramid")
        moving_pyr = pyramid(moving)
        fixed_pyr = pyramid(fixed)

        outputs = {}
        warped_in = moving
        v_acc = None
        for level in range(1, n_levels + 1):
            pair = keras.layers.Concatenate(name=f"input_level{level}")([warped_in, fixed])
            v_inc = subnetwork(pair, level, enc, hp["dec_features"], hp["head_features"],
                               name=f"S{level}")
            outputs[f"velocity_level{level}"] = v_inc
            if v_acc is None:
                v_acc = v_inc
            else:
                v_acc = keras.layers.Add(**F32, name=f"v_acc_level{level}")(
                    [layers.RescaleTransform(2, **F32, name=f"v_up_level{level}")(v_acc), v_inc])
            if level == n_levels:
                break
            grid = depth - level  # pyramid index of level l's grid (1/2**grid resolution)
            integrate = layers.VecInt(hp["int_steps"], **F32, name=f"integrate_level{level}")
            disp_l = integrate(v_acc)
            outputs[f"warped_level{level}"] = layers.SpatialTransformer(
                **F32, name=f"warp_level{level}")([moving_pyr[grid], disp_l])
            if hp["bidirectional"]:
                negate = keras.layers.Rescaling(-1.0, **F32, name=f"negate_level{level}")
                inv_l = integrate(negate(v_acc))
                outputs[f"warped_fixed_level{level}"] = layers.SpatialTransformer(
                    **F32, name=f"warp_fixed_level{level}")([fixed_pyr[grid], inv_l])
            disp_full = layers.RescaleTransform(2 ** grid, **F32,
                                                name=f"disp_up_level{level}")(disp_l)
            warped_in = layers.SpatialTransformer(**F32, name=f"warp_input_level{level + 1}")(
                [moving, disp_full])

        # Final SVF to full resolution by linear interpolation (paper: "obtained from the output
        # of the 1/2 resolution using linear interpolation"), or to the 1/int_downsize grid.
        grid = depth - n_levels
        downsize = int(hp["int_downsize"])
        if downsize < 1 or (2 ** grid) % downsize:
            raise ValueError(f"int_downsize must divide {2 ** grid} (the SVF of level "
                             f"{n_levels} is at 1/{2 ** grid} resolution), got {downsize}")
        velocity = v_acc
        if 2 ** grid // downsize > 1:
            velocity = layers.RescaleTransform(2 ** grid // downsize, **F32,
                                               name="velocity_full")(v_acc)
        smooth = None
        if hp["smoothing"] != "none":
            smooth = layers.GaussianSmooth3D(hp["smooth_sigma"], hp["smooth_kernel"], ndims=ndims,
                                             **F32, name="smoothing")
        if hp["smoothing"] == "velocity":
            velocity = smooth(velocity)
        integrate = layers.VecInt(hp["int_steps"], **F32, name="integrate")
        disp = integrate(velocity)
        inverse_disp = integrate(keras.layers.Rescaling(-1.0, **F32, name="negate")(velocity))
        if downsize > 1:
            disp = layers.RescaleTransform(downsize, **F32, name="disp_full")(disp)
            inverse_disp = layers.RescaleTransform(downsize, **F32, name="inverse_disp_full")(
                inverse_disp)
        if hp["smoothing"] == "deformation":
            disp = smooth(disp)
            inverse_disp = smooth(inverse_disp)
        outputs["velocity"] = velocity
        outputs["disp"] = disp
        outputs["inverse_disp"] = inverse_disp
        outputs["warped"] = layers.SpatialTransformer(**F32, name="warp")([moving, disp])
        outputs["warped_fixed"] = layers.SpatialTransformer(**F32, name="warp_fixed")(
            [fixed, inverse_disp])
        return keras.Model([moving, fixed], outputs, name="mdregnet")

    def build_objective(self, hp):
        return MultiLevelObjective(levels=hp["levels"], depth=len(hp["enc_features"]),
                                   lam=hp["lam"], ncc_window=hp["ncc_window"],
                                   bidirectional=hp["bidirectional"],
                                   level_weights=hp["level_weights"], penalty="l1")


class MultiLevelObjective:
    """Deep self-supervised bidirectional loss of MDReg-Net (paper eq. 3).

    `sum_l w_l [-NCC(I_f^l, I_m^l o Phi(v~^l)) - NCC(I_m^l, I_f^l o Phi^-(v~^l))]
     + lam * sum_l ||grad v^l||_1`, with the images at each level from the average-pooling
    pyramid (kernel 3, stride 2), level L at full resolution with the final transform, and the
    gradient penalty averaged over the voxels of each v^l's own grid (`losses.Grad`).

    Call arguments:
        moving, fixed: `(B, *spatial, 1)` images; outputs: the model's output dict.

    Returns:
        `(total, terms)`: float32 scalar and a dict with 'sim_level{l}', 'grad_level{l}', 'sim',
        'grad'.
    """

    def __init__(self, levels, depth, lam, ncc_window, bidirectional, level_weights,
                 penalty="l1"):
        if len(level_weights) != levels:
            raise ValueError(f"level_weights needs {levels} values, got {level_weights}")
        self.levels = levels
        self.depth = depth
        self.lam = float(lam)
        self.bidirectional = bool(bidirectional)
        self.level_weights = [float(w) for w in level_weights]
        self.similarity = losses.NCC(window=ncc_window)
        self.regulariser = losses.Grad(penalty)

    def __call__(self, moving, fixed, outputs):
        moving_pyr = layers.avg_pool_pyramid(moving, self.depth)
        fixed_pyr = layers.avg_pool_pyramid(fixed, self.depth)
        terms = {}
        sim_total = 0.0
        grad_total = 0.0
        for level in range(1, self.levels + 1):
            if level == self.levels:
                fix, mov, suffix = fixed, moving, ""
            else:
                grid = self.depth - level
                fix, mov, suffix = fixed_pyr[grid], moving_pyr[grid], f"_level{level}"
            sim = losses.pair_similarity(
                self.similarity, fix, mov, outputs["warped" + suffix],
                outputs["warped_fixed" + suffix] if self.bidirectional else None)
            grad = self.regulariser(None, outputs[f"velocity_level{level}"])
            terms[f"sim_level{level}"] = sim
            terms[f"grad_level{level}"] = grad
            sim_total += self.level_weights[level - 1] * sim
            grad_total += grad
        terms["sim"] = sim_total
        terms["grad"] = grad_total
        return tf.cast(sim_total + self.lam * grad_total, tf.float32), terms
