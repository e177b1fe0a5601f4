"""Test-time refinement: optimise one pair's stationary velocity field from the network's guess.

Li & Fan, "Non-rigid image registration using fully convolutional networks with deep
self-supervision" (`../shared/papers/fcn-deep-self-supervision.md`), Discussions: "the trained
fully convolutional networks could be further improved for predicting spatial transformations
between images if the optimization of spatial transformation is utilized to register new images
with the backpropagation computation". This module does that optimisation for one pair, on the
transformation itself rather than on the network weights:

    v_0   = the model's 'velocity' output for (moving, fixed)
    v_k+1 = Adam step on  L(v) = w_L [-S(I_f, I_m o Phi(v)) - S(I_m, I_f o Phi^-(v))]
                                  + lam * R(v)
    Phi(v), Phi^-(v): the model's OWN mapping from its velocity to 'disp' / 'inverse_disp'

The mapping is rebuilt from the model's hyper-parameters with the package's layer functions
(`layers.integrate_svf`, `layers.rescale_field`, `layers.gaussian_smooth`, `layers.warp`), so the
refined transform is still `exp(v)` by the model's scaling and squaring (diffeomorphic up to the
discretisation, as the network's own output), and with 0 steps it IS the model's output (checked
at run time, to `START_TOLERANCE` voxels, and in `tests/test_refine.py` to 1e-5):

    mdregnet   velocity at full resolution (at 1/int_downsize with that option, the
               displacement then rescaled as for voxelmorph); smoothing 'deformation' (default):
               disp = G_sigma(exp(v)), inverse_disp = G_sigma(exp(-v));
               'velocity': the output velocity is already G_sigma(v_raw), so the refined field is
               v_0 + G_sigma(delta) with delta optimised from 0 (G is linear: exactly the model's
               smoothing of a refined raw velocity); 'none': disp = exp(v)
    voxelmorph velocity at 1/int_downsize resolution:
               disp = rescale_field(exp(v), int_downsize) (interpolated AND scaled)

Loss. The similarity is the model's final-resolution term (its objective's `similarity`,
bidirectional when the objective is, with the final level's weight). The regulariser is the
objective's `regulariser` (TV / l1 `Grad` for MDReg-Net, l2 `Grad` for VoxelMorph) with the
objective's `lam`, applied to the velocity being optimised (see `Refiner.loss` for why).

Shapes: images `(1, *spatial, 1)` float32 in [0, 1] on the model's input grid (pad first, as
`infer.fit_model`); fields `(1, *grid, ndims)` in voxels of their grid (CONVENTIONS.md).
"""

import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from mdregnet import layers, losses, models

__all__ = ["DEFAULT_LR", "START_TOLERANCE", "Refiner", "refine", "refiner_for"]

#: Default Adam step size, in voxels of the velocity grid (Adam's first steps move every voxel
#: by about `lr`). Sweep on the real OASIS pair of the tests (32x48x48, 4 mm, `oasis_pair_3d`),
#: untrained model (identity start, Dice 0.469), 50 steps, lr 0.03 / 0.1 / 0.3 / 1.0:
#: mdregnet Dice 0.630 / 0.653 / 0.649 / 0.652 (folded voxels 0 / 0 / 0 / 2),
#: voxelmorph Dice 0.639 / 0.639 / 0.645 / 0.631 (no folding); at 10 steps 0.03 had not yet
#: moved any label (mdregnet 0.469). 0.1 is the best Dice without folding for MDReg-Net.
DEFAULT_LR = 0.1

#: Largest |disp(v_0) - model disp| (voxels) accepted as "the model's own mapping"; beyond it
#: `refine` raises, since the refinement would not start from the model's prediction.
START_TOLERANCE = 1e-3

_REFINERS = weakref.WeakKeyDictionary()


def _velocity_models():
    return [name for name in models.available() if models.get_method(name).diffeomorphic]


class Refiner:
    """The refinement machinery of one model: its velocity-to-field mapping, loss and optimiser.

    Built once per model (see `refiner_for`) so the compiled step is reused across pairs.

    Args:
        model: a model from `models.build`/`models.load` (has `mdregnet_config`) of a diffeomorphic
            method that outputs 'velocity'.

    Raises:
        ValueError: a model without `mdregnet_config`, of a method without a stationary velocity
            field (e.g. prdfe, fcn_ds), or whose objective lacks the similarity / regulariser /
            lam this module needs.
    """

    def __init__(self, model):
        if not hasattr(model, "mdregnet_config"):
            raise ValueError("refine needs a model built by mdregnet.models.build/load (no "
                             "mdregnet_config)")
        config = model.mdregnet_config
        name, hp = config["name"], dict(config["hparams"])
        method = models.get_method(name)
        if not method.diffeomorphic or "velocity" not in model.output:
            raise ValueError(f"model {name!r} has no stationary velocity field ('velocity' "
                             "output): test-time refinement optimises the SVF of a "
                             f"diffeomorphic model ({', '.join(_velocity_models())})")
        self.name = name
        self._model = weakref.ref(model)  # the cache below is keyed by the model: no cycle
        self.input_shape = tuple(int(n) for n in config["input_shape"])
        self.ndims = len(self.input_shape)
        # The model's velocity -> disp mapping, from its hyper-parameters.
        self.int_steps = int(hp["int_steps"])
        self.downsize = int(hp.get("int_downsize", 1))
        self.smoothing = hp.get("smoothing", "none")
        self.smooth_sigma = float(hp.get("smooth_sigma", 1.732))
        self.smooth_kernel = int(hp.get("smooth_kernel", 3))
        self.velocity_shape = tuple(n // self.downsize for n in self.input_shape)
        # The model's loss terms.
        objective = models.objective(model)
        for attr in ("similarity", "regulariser", "lam", "bidirectional"):
            if not hasattr(objective, attr):
                raise ValueError(f"the objective of model {name!r} ({type(objective).__name__}) "
                                 f"has no {attr!r}: refine cannot rebuild its loss")
        self.similarity = objective.similarity
        self.regulariser = objective.regulariser
        self.lam = float(objective.lam)
        self.bidirectional = bool(objective.bidirectional)
        # MDReg-Net weights each level's similarity; the refined transform is the final level's.
        self.sim_weight = float(getattr(objective, "level_weights", [1.0])[-1])

        vel = (1, *self.velocity_shape, self.ndims)
        self._base = tf.Variable(tf.zeros(vel), trainable=False, name="refine_base")
        self._delta = tf.Variable(tf.zeros(vel), name="refine_delta")
        # Keras's Adam (Kingma & Ba 2015); its state is zeroed for each pair in `run`.
        self._optimizer = keras.optimizers.Adam(learning_rate=DEFAULT_LR)
        self._optimizer.build([self._delta])
        self._step_fn = tf.function(self._step)
        self._evaluate_fn = tf.function(self._evaluate)

    # -- the model's mapping and loss -------------------------------------------------------------
    def velocity(self, base, delta):
        """The SVF `(1, *grid, ndims)` in voxels of its grid: `base + delta`, or with smoothing
        'velocity' `base + G_sigma(delta)` (the model smooths its raw velocity, G is linear)."""
        if self.smoothing == "velocity":
            return base + layers.gaussian_smooth(delta, self.smooth_sigma, self.smooth_kernel)
        return base + delta

    def fields(self, velocity, inverse=True):
        """The model's `disp` (and `inverse_disp`) for `velocity`, as the model computes them.

        Args:
            velocity: `(1, *grid, ndims)` float32 SVF in voxels of its grid (the model's
                'velocity' output convention).
            inverse: also return the inverse displacement (`exp(-v)` mapped the same way).

        Returns:
            dict 'disp' (and 'inverse_disp'): `(1, *input_shape, ndims)` float32, voxels of the
            input grid.
        """
        out = {"disp": self._map(layers.integrate_svf(velocity, self.int_steps))}
        if inverse:
            out["inverse_disp"] = self._map(layers.integrate_svf(-velocity, self.int_steps))
        return out

    def _map(self, disp):
        if self.downsize != 1:  # VoxelMorph int_downsize: back to full resolution
            disp = layers.rescale_field(disp, zoom_factor=self.downsize)
        if self.smoothing == "deformation":  # MDReg-Net's smoothing layer on each deformation
            disp = layers.gaussian_smooth(disp, self.smooth_sigma, self.smooth_kernel)
        return disp

    def outputs(self, velocity, moving, fixed, inverse=True):
        """Model-like outputs of `velocity`: 'velocity', 'disp', 'warped' and, with `inverse`,
        'inverse_disp', 'warped_fixed' (trilinear, 0 outside, as the model's warps)."""
        out = {"velocity": velocity, **self.fields(velocity, inverse)}
        out["warped"] = layers.warp(moving, out["disp"])
        if inverse:
            out["warped_fixed"] = layers.warp(fixed, out["inverse_disp"])
        return out

    def loss(self, moving, fixed, outputs):
        """The model's final-resolution loss of `outputs`; returns `(total, {'sim', 'grad'})`.

        `sim` is the objective's similarity (forward plus inverse when bidirectional) times the
        final level's weight, `grad` the objective's regulariser of `outputs['velocity']`.

        Regulariser choice: on the velocity, not on disp. The variable optimised is the SVF, and
        both objectives regularise an SVF: VoxelMorph exactly this one, MDReg-Net the increments
        v^l whose sum, up-sampled, is this full-resolution velocity. `losses.Grad` is a mean of
        dimensionless gradients, so the same `lam` applies on the full-resolution grid (its
        docstring). Penalising disp instead would, with MDReg-Net's 'deformation' smoothing,
        leave the part of v that G_sigma damps unpenalised (e.g. voxel-scale oscillations of v
        that still bend exp(v)), and it is not what either paper's R(v) measures.
        """
        sim = self.sim_weight * losses.pair_similarity(
            self.similarity, fixed, moving, outputs["warped"],
            outputs["warped_fixed"] if self.bidirectional else None)
        grad = self.regulariser(None, outputs["velocity"])
        return tf.cast(sim + self.lam * grad, tf.float32), {"sim": sim, "grad": grad}

    # -- optimisation ---------------------------------------------------------------------------
    def _step(self, moving, fixed):
        """One Adam step on delta; returns the loss and outputs BEFORE the update."""
        with tf.GradientTape() as tape:
            velocity = self.velocity(self._base, self._delta)
            outputs = self.outputs(velocity, moving, fixed, inverse=self.bidirectional)
            total, terms = self.loss(moving, fixed, outputs)
        grad = tape.gradient(total, self._delta)
        self._optimizer.apply_gradients([(grad, self._delta)])
        return total, terms, outputs

    def _evaluate(self, moving, fixed):
        velocity = self.velocity(self._base, self._delta)
        outputs = self.outputs(velocity, moving, fixed, inverse=True)
        total, terms = self.loss(moving, fixed, outputs)
        return total, terms, outputs

    def _check_inputs(self, moving, fixed):
        shape = (1, *self.input_shape, 1)
        out = []
        for what, image in (("moving", moving), ("fixed", fixed)):
            image = tf.cast(tf.convert_to_tensor(image), tf.float32)
            if tuple(image.shape) != shape:
                raise ValueError(f"refine: {what} image must have shape {shape} (one pair on the "
                                 f"model's input grid), got {tuple(image.shape)}")
            out.append(image)
        return out

    def _check_start(self, model_outputs, outputs):
        """Max |disp(v_0) - model disp| over 'disp' and 'inverse_disp' present in both."""
        worst = 0.0
        for key in ("disp", "inverse_disp"):
            if key in model_outputs and key in outputs:
                diff = np.max(np.abs(np.asarray(outputs[key]) - np.asarray(model_outputs[key])))
                worst = max(worst, float(diff))
        if worst > START_TOLERANCE:
            raise ValueError(f"refine: the velocity-to-displacement mapping rebuilt for model "
                             f"{self.name!r} differs from the model's own output by {worst:.3g} "
                             f"voxels (> {START_TOLERANCE}); refinement would not start from the "
                             "model's prediction")
        return worst

    def run(self, moving, fixed, steps, lr=None, outputs=None, callback=None):
        """Refines one pair; see `refine` (same arguments and results)."""
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"refine: steps must be >= 0, got {steps}")
        lr = DEFAULT_LR if lr is None else float(lr)
        if not lr > 0:
            raise ValueError(f"refine: lr must be > 0, got {lr}")
        moving, fixed = self._check_inputs(moving, fixed)
        if outputs is None:
            outputs = self._model()([moving, fixed], training=False)
        if "velocity" not in outputs:
            raise ValueError("refine: outputs has no 'velocity'")
        start = time.perf_counter()
        velocity = tf.cast(outputs["velocity"], tf.float32)
        expect = (1, *self.velocity_shape, self.ndims)
        if tuple(velocity.shape) != expect:
            raise ValueError(f"refine: model {self.name!r} velocity has shape "
                             f"{tuple(velocity.shape)}, expected {expect} from its hparams")
        self._base.assign(velocity)
        self._delta.assign(tf.zeros_like(self._delta))
        for var in self._optimizer.variables:  # iterations, moments (and the rate, set below)
            var.assign(tf.zeros_like(var))
        self._optimizer.learning_rate = lr
        history, history_terms = [], {}
        mismatch = None
        for k in range(steps):
            total, terms, current = self._step_fn(moving, fixed)
            if k == 0:
                mismatch = self._check_start(outputs, current)
            history.append(total)
            for key, value in terms.items():
                history_terms.setdefault(key, []).append(value)
            if callback is not None:
                callback(k, current)
        total, terms, final = self._evaluate_fn(moving, fixed)
        if steps == 0:
            mismatch = self._check_start(outputs, final)
        if callback is not None:
            callback(steps, final)
        history.append(total)
        for key, value in terms.items():
            history_terms.setdefault(key, []).append(value)
        history = [float(v) for v in history]  # also waits for the device
        history_terms = {key: [float(v) for v in values] for key, values in history_terms.items()}
        seconds = time.perf_counter() - start
        info = {
            "model": self.name,
            "steps": steps,
            "lr": lr,
            "seconds": seconds,
            "loss_before": history[0],
            "loss_after": history[-1],
            "terms_before": {key: values[0] for key, values in history_terms.items()},
            "terms_after": {key: values[-1] for key, values in history_terms.items()},
            "history": history,
            "history_terms": history_terms,
            "start_mismatch_vox": mismatch,
            "lam": self.lam,
        }
        return final, info


def refiner_for(model):
    """The `Refiner` of `model`, built on first use and kept while the model lives."""
    refiner = _REFINERS.get(model)
    if refiner is None:
        refiner = Refiner(model)
        _REFINERS[model] = refiner
    return refiner


def refine(model, moving, fixed, steps, lr=DEFAULT_LR, outputs=None, callback=None):
    """Refines the model's registration of one pair by optimising its SVF (test-time Adam).

    Starts from the model's velocity `v_0` and takes `steps` Adam steps on the model's own
    final-resolution loss (module docstring), keeping the model's mapping `v -> disp`, so the
    result is `exp(v)` by the model's scaling and squaring and its smoothing / resizing. The
    network weights are not changed. This is the optimisation "utilized to register new images
    with the backpropagation computation" of Li & Fan's Discussions (FCN with deep
    self-supervision), applied to the transformation of one pair.

    Args:
        model: a model from `models.build`/`models.load` of a method with a 'velocity' output
            (mdregnet, voxelmorph), built for the images' grid.
        moving, fixed: `(1, *input_shape, 1)` float32 (numpy or tensor) in [0, 1], on the model's
            input grid (padded as `infer.fit_model` says).
        steps: number of Adam steps, >= 0 (0 returns the model's own transform).
        lr: Adam step size in voxels of the velocity grid (None: `DEFAULT_LR`).
        outputs: the model's outputs for this pair if already computed (at least 'velocity',
            and 'disp' / 'inverse_disp' for the start check); None runs the model.
        callback: optional `callback(k, outputs_k)` called for k = 0..steps with the outputs of
            the field after k steps (tensors as below; for k < steps without the inverse keys
            when the objective is not bidirectional), e.g. to trace Dice against steps. It costs
            nothing extra: the step computes them anyway.

    Returns:
        `(outputs, info)`. `outputs`: dict of float32 tensors of the refined field, 'velocity'
        `(1, *grid, ndims)` (voxels of the velocity grid), 'disp' and 'inverse_disp'
        `(1, *input_shape, ndims)` (voxels), 'warped' and 'warped_fixed' `(1, *input_shape, 1)`;
        the model's per-level outputs are not reproduced. `info`: dict with 'model', 'steps',
        'lr', 'seconds' (wall time of the refinement, model call excluded; a model's first
        refinement also traces the step and compiles its warps), 'loss_before' and
        'loss_after' (total loss at v_0 and at the result), 'terms_before' / 'terms_after'
        ({'sim', 'grad'}), 'history' (steps + 1 totals: history[k] after k steps),
        'history_terms' (same per term), 'start_mismatch_vox' (max |disp(v_0) - model disp|),
        'lam'.

    Raises:
        ValueError: a model without a velocity output (the message names it), images of the
            wrong shape, steps < 0, lr <= 0, or a rebuilt mapping that does not reproduce the
            model's disp to `START_TOLERANCE` voxels.

    References:
        Li & Fan, Non-rigid image registration using fully convolutional networks with deep
        self-supervision, Discussions; Zhuo & Fan, MDReg-Net (eq. 3, smoothing layer);
        Dalca et al. 2019 (SVF, scaling and squaring); Kingma & Ba 2015 (Adam).
    """
    return refiner_for(model).run(moving, fixed, steps, lr=lr, outputs=outputs,
                                  callback=callback)
