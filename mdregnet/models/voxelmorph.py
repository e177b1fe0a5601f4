"""Diffeomorphic, bidirectional VoxelMorph, as the seed paper used it for comparison and ablation.

Dalca, Balakrishnan, Guttag & Sabuncu, "Unsupervised learning of probabilistic diffeomorphic
registration for images and surfaces", MedIA 2019 (and MICCAI 2018); Balakrishnan et al.,
"VoxelMorph", TMI 2019. MDReg-Net (`../shared/papers/mdregnet.md`, Comparison section) trained it
"with bi-directional image similarity based loss" and 7 integration steps, with its own training
settings (lr 1e-4, batch 1).

Network (VoxelMorph-2 U-Net): encoder convs [16, 32, 32, 32], stride 2; decoder [32, 32, 32, 32,
32, 16, 16]: the first four each followed (but the 4th) by x2 up-sampling and a skip concatenation,
up to full resolution, then a 3^d output conv to an ndims-channel field. As in VoxelMorph's
`int_downsize=2`, that field is resized to half resolution (magnitude scaled) to be the SVF,
integrated with 7 squaring steps there, and the displacement brought back to full resolution.

Output keys: 'warped', 'warped_fixed' `(B, *spatial, 1)`; 'disp', 'inverse_disp'
`(B, *spatial, ndims)` voxels; 'velocity' `(B, *spatial/2, ndims)`, the SVF in half-resolution
voxels (regularised by the objective).
"""

import keras
import tensorflow as tf

from mdregnet import layers, losses
from mdregnet.models import blocks
from mdregnet.models.blocks import FLOAT32 as F32
from mdregnet.models.registry import Method, register

#: Values of the `similarity` hyper-parameter.
_SIMILARITIES = ("ncc", "mse")


def unet(x, enc_features, dec_features):
    """VoxelMorph U-Net: stride-2 encoder, up-sampling decoder with skips, full-resolution out.

    Decoder layout (VoxelMorph-2): `dec_features[:len(enc)]` are convs at the bottleneck and each
    coarser-to-finer level, each followed by x2 up-sampling and concatenation with the encoder
    feature of that resolution, until half resolution; the next conv runs at half resolution, then
    up-sampling to full resolution with the input as skip, then the remaining convs.

    Args:
        x: `(B, *spatial, 2)` [moving, fixed].

    Returns:
        `(B, *spatial, dec_features[-1])` features at full resolution.
    """
    skips = [x]
    h = x
    for i, filters in enumerate(enc_features):
        h = blocks.conv(h, filters, strides=2, name=f"enc{i}")
        skips.append(h)
    skips.pop()
    dec = list(dec_features)
    n_up = len(enc_features)
    for i in range(n_up):
        h = blocks.conv(h, dec[i], name=f"dec{i}")
        if i < n_up - 1:
            h = blocks.upsample(h, name=f"up{i}")
            h = keras.layers.Concatenate(name=f"skip{i}")([h, skips.pop()])
    # remaining convs: one at half resolution, then up to full resolution with the input skip
    h = blocks.conv(h, dec[n_up], name=f"dec{n_up}")
    h = blocks.upsample(h, name=f"up{n_up - 1}")
    h = keras.layers.Concatenate(name=f"skip{n_up - 1}")([h, skips.pop()])
    for i in range(n_up + 1, len(dec)):
        h = blocks.conv(h, dec[i], name=f"dec{i}")
    return h


@register("voxelmorph")
class VoxelMorph(Method):
    """Diffeomorphic bidirectional VoxelMorph (VoxelMorph-diff), the seed paper's baseline."""

    diffeomorphic = True
    divisor = 16
    defaults = {
        "enc_features": [16, 32, 32, 32],
        "dec_features": [32, 32, 32, 32, 32, 16, 16],
        "int_steps": 7,
        "int_downsize": 2,  # SVF at half resolution, as VoxelMorph's default
        # Loss: bidirectional local NCC (window 9) + lam * Grad on the SVF. The seed paper tuned
        # lam on its validation set without reporting it; the l2 gradient penalty and lam = 1 are
        # VoxelMorph's own recommendation for NCC.
        "lam": 1.0,
        "penalty": "l2",
        "ncc_window": 9,
        "bidirectional": True,
        # Image similarity of the objective: 'ncc' (local NCC, window `ncc_window`; the seed
        # paper's and VoxelMorph-diff's choice) or 'mse' (mean squared intensity difference, the
        # "VoxelMorph-2 with MSE loss" baseline of PRDFE, Zhou et al., Sec. III-D).
        "similarity": "ncc",
    }

    def build_model(self, input_shape, hp):
        if hp["similarity"] not in _SIMILARITIES:
            raise ValueError(f"similarity must be one of {_SIMILARITIES}, got "
                             f"{hp['similarity']!r}")
        if len(hp["dec_features"]) < len(hp["enc_features"]) + 1:
            raise ValueError("dec_features needs at least len(enc_features) + 1 entries")
        ndims = len(input_shape)
        moving = keras.Input((*input_shape, 1), name="moving")
        fixed = keras.Input((*input_shape, 1), name="fixed")
        x = keras.layers.Concatenate(name="input_pair")([moving, fixed])
        h = unet(x, hp["enc_features"], hp["dec_features"])
        flow = blocks.flow_head(h, ndims, name="flow")
        down = int(hp["int_downsize"])
        velocity = flow if down == 1 else layers.RescaleTransform(1.0 / down, **F32,
                                                                  name="svf_down")(flow)
        integrate = layers.VecInt(hp["int_steps"], **F32, name="integrate")
        disp = integrate(velocity)
        inverse_disp = integrate(keras.layers.Rescaling(-1.0, **F32, name="negate")(velocity))
        if down != 1:
            disp = layers.RescaleTransform(down, **F32, name="disp_up")(disp)
            inverse_disp = layers.RescaleTransform(down, **F32,
                                                   name="inverse_disp_up")(inverse_disp)
        outputs = {
            "velocity": velocity,
            "disp": disp,
            "inverse_disp": inverse_disp,
            "warped": layers.SpatialTransformer(**F32, name="warp")([moving, disp]),
            "warped_fixed": layers.SpatialTransformer(**F32, name="warp_fixed")(
                [fixed, inverse_disp]),
        }
        return keras.Model([moving, fixed], outputs, name="voxelmorph")

    def build_objective(self, hp):
        return VoxelMorphObjective(hp["lam"], hp["penalty"], hp["ncc_window"],
                                   hp["bidirectional"], hp["similarity"])


class VoxelMorphObjective:
    """`-NCC(I_f, I_m o phi) - NCC(I_m, I_f o phi^-1) + lam * Grad(v)` (Dalca et al. 2019, bidir).

    With `similarity='mse'` the terms are `MSE(I_f, I_m o phi) [+ MSE(I_m, I_f o phi^-1)]`
    (`losses.MSE`), the objective of VoxelMorph-2 with MSE loss (Balakrishnan et al. 2018).

    Args:
        lam: weight of the gradient penalty of the SVF ('velocity').
        penalty: 'l1' or 'l2' (`losses.Grad`).
        ncc_window: local NCC window per axis (unused for 'mse').
        bidirectional: add the inverse term.
        similarity: 'ncc' (default) or 'mse'.

    Returns:
        `(total, terms)` with terms 'sim' and 'grad'.

    Raises:
        ValueError: an unknown `similarity`.
    """

    def __init__(self, lam, penalty, ncc_window, bidirectional, similarity="ncc"):
        if similarity not in _SIMILARITIES:
            raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
        self.lam = float(lam)
        self.bidirectional = bool(bidirectional)
        self.similarity = (losses.NCC(window=ncc_window) if similarity == "ncc"
                           else losses.MSE())
        self.regulariser = losses.Grad(penalty)

    def __call__(self, moving, fixed, outputs):
        sim = losses.pair_similarity(self.similarity, fixed, moving, outputs["warped"],
                                     outputs["warped_fixed"] if self.bidirectional else None)
        grad = self.regulariser(None, outputs["velocity"])
        total = tf.cast(sim + self.lam * grad, tf.float32)
        return total, {"sim": sim, "grad": grad}
