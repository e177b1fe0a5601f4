"""Patch-based diffeomorphic FCN (Wu et al., `../shared/papers/patch-based-diffeomorphic-fcn.md`):
`mdregnet.models.patch_fcn`, its operator regulariser `losses.OperatorNorm`, and `mdregnet.patches`.

Models are built with tiny channel counts (`TINY`) at 32^3 on CPU; the paper's sizes are the
defaults and are checked as data.
"""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from mdregnet import layers, losses, models, patches
from mdregnet.models import patch_fcn

TINY = {"features": [4, 4, 8, 8, 8]}
SHAPE = (32, 32, 32)
RNG = np.random.default_rng(5)


def smooth_pair(shape, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = ndimage.gaussian_filter(rng.random((batch, *shape, 1)), [0] + [2] * len(shape) + [0])
        out.append(((x - x.min()) / (x.max() - x.min())).astype(np.float32))
    return out


def heads(net):
    """{level: head conv layer} of a stage network."""
    return {int(layer.name.rsplit("head", 1)[1]): layer for layer in net.layers
            if "_head" in layer.name}


def set_constant_velocity(net, value):
    """The stage network outputs the constant `value`: all head kernels 0, head0's bias = value."""
    for level, layer in heads(net).items():
        kernel, bias = layer.get_weights()
        bias = np.asarray(value, np.float32) if level == 0 else np.zeros_like(bias)
        layer.set_weights([np.zeros_like(kernel), bias])


def scale_velocity(model, pair, target):
    """Scales each stage's heads (in stage order) so that max |v_j| = target voxels (v_j is
    linear in the head weights)."""
    for j, net in enumerate(patch_fcn.stage_networks(model), start=1):
        v = model(pair)[f"velocity_stage{j}"].numpy()
        factor = target / np.abs(v).max()
        for layer in heads(net).values():
            layer.set_weights([w * factor for w in layer.get_weights()])


def perturb(model, stddev, seed):
    """Moves the trainable weights away from the identity start (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    for w in model.trainable_weights:
        w.assign(w.numpy() + rng.normal(0.0, stddev, w.shape).astype(np.float32))


def map_field(field, disp):
    """`field(p + disp(p))` per channel, trilinear, border replicated (numpy reference of
    `layers.warp(..., fill_value=None)`). field, disp: `(X, Y, Z, C)`, `(X, Y, Z, 3)`."""
    grid = np.meshgrid(*[np.arange(n) for n in disp.shape[:-1]], indexing="ij")
    coords = [g + disp[..., c] for c, g in enumerate(grid)]
    return np.stack([ndimage.map_coordinates(field[..., c], coords, order=1, mode="nearest")
                     for c in range(field.shape[-1])], axis=-1)


def map_image(image, disp):
    """`image(p + disp(p))`, trilinear, 0 outside (as `layers.warp`)."""
    grid = np.meshgrid(*[np.arange(n) for n in disp.shape[:-1]], indexing="ij")
    coords = [g + disp[..., c] for c, g in enumerate(grid)]
    return ndimage.map_coordinates(image, coords, order=1, mode="grid-constant", cval=0.0)


# ------------------------------------------------------------------------------------------------
# Registration, defaults, validation
# ------------------------------------------------------------------------------------------------
def test_registered_with_the_paper_defaults():
    assert "patch_fcn" in models.available()
    method = models.get_method("patch_fcn")
    assert method.diffeomorphic and method.divisor == 16  # four stride-2 levels
    hp = models.defaults("patch_fcn")
    assert hp["stages"] == 3 and hp["alphas"] == [0.01, 0.005, 0.001]  # II-D
    assert hp["ncc_window"] == 7 and hp["patch_size"] == 64 and hp["patch_keep"] == 32  # II-D
    assert hp["lam"] == pytest.approx(0.001 ** 2)  # sigma^2 (eq. 4 vs eq. 3)
    assert hp["int_steps"] == 7 and hp["train_stage"] == 1 and hp["init_from"] is None
    assert hp["features"] == [16, 32, 64, 128, 256] and hp["sobolev_gradient"] is True
    assert patch_fcn.PAPER_TRAINING["learning_rate"] == 1e-4
    assert patch_fcn.PAPER_TRAINING["batch_size"] == 16
    json.dumps(hp)
    for stage, alpha in ((1, 0.01), (2, 0.005), (3, 0.001)):
        objective = models.objective("patch_fcn", train_stage=stage)
        assert objective.regulariser.alpha == alpha and objective.similarity.window == 7
        assert objective.lam == hp["lam"] and objective.bidirectional is False


def test_bad_hparams_and_shapes():
    with pytest.raises(ValueError, match="alphas"):
        models.build("patch_fcn", SHAPE, alphas=[0.01, 0.005], **TINY)
    with pytest.raises(ValueError, match="train_stage"):
        models.build("patch_fcn", SHAPE, train_stage=4, **TINY)
    with pytest.raises(ValueError, match="features"):
        models.build("patch_fcn", SHAPE, features=[4, 4, 8, 8])
    with pytest.raises(ValueError, match="init_from"):
        models.build("patch_fcn", SHAPE, init_from="somewhere", **TINY)
    with pytest.raises(ValueError, match="patch_keep"):
        models.build("patch_fcn", SHAPE, patch_keep=31, **TINY)
    with pytest.raises(ValueError, match="divisible by 16"):
        models.build("patch_fcn", (32, 24, 32), **TINY)


# ------------------------------------------------------------------------------------------------
# Architecture (Fig. 1c)
# ------------------------------------------------------------------------------------------------
def fig1c_params(ndims, f):
    """Independent parameter count of one stage from the text of II-C (see the module docstring)."""
    def conv(k, cin, cout):
        return k ** ndims * cin * cout + cout

    n = conv(3, 2, f[0])
    for level in range(1, 5):  # down (2^d, stride 2) + pooled input conv (3^d) + conv (3^d)
        n += conv(2, f[level - 1], f[level]) + conv(3, 2, f[level]) + conv(3, f[level], f[level])
    for level in range(3, -1, -1):  # transposed conv (2^d) + conv on [up, skip] (3^d)
        n += conv(2, f[level + 1], f[level]) + conv(3, 2 * f[level], f[level])
    n += sum(conv(3, f[level], ndims) for level in range(5))  # five heads
    return n


@pytest.mark.parametrize("ndims", [2, 3])
def test_parameter_count_follows_fig1c(ndims):
    features = [3, 4, 5, 6, 7]
    shape = (32,) * ndims
    one = models.build("patch_fcn", shape, features=features)
    assert one.count_params() == fig1c_params(ndims, features)
    three = models.build("patch_fcn", shape, features=features, train_stage=3)
    assert three.count_params() == 3 * fig1c_params(ndims, features)
    # stages 1 and 2 frozen: only stage 3 trains
    trainable = sum(int(np.prod(w.shape)) for w in three.trainable_weights)
    assert trainable == fig1c_params(ndims, features)
    assert len(patch_fcn.stage_networks(three)) == 3


def test_five_heads_are_summed_into_the_velocity():
    net = patch_fcn.stage_network(3, [2, 2, 2, 2, 2], "s")
    x = smooth_pair(SHAPE)
    contributions = {}
    for level in range(5):
        for other, layer in heads(net).items():
            kernel, bias = layer.get_weights()
            value = np.float32(10.0 ** level) if other == level else 0.0
            layer.set_weights([np.zeros_like(kernel), np.full_like(bias, value)])
        contributions[level] = net(x).numpy()
        np.testing.assert_allclose(contributions[level], 10.0 ** level, rtol=1e-6)
    for layer in heads(net).values():
        kernel, bias = layer.get_weights()
        layer.set_weights([np.zeros_like(kernel), np.ones_like(bias)])
    np.testing.assert_allclose(net(x).numpy(), 5.0, rtol=1e-6)


@pytest.mark.parametrize("stage", [1, 3])
def test_output_shapes_and_identity_start(stage):
    model = models.build("patch_fcn", SHAPE, train_stage=stage, **TINY)
    moving, fixed = smooth_pair(SHAPE)
    out = model([moving, fixed])
    expected = {"warped", "disp", "inverse_disp", "velocity"}
    for j in range(1, stage + 1):
        expected |= {f"velocity_stage{j}", f"disp_stage{j}", f"inverse_disp_stage{j}"}
    assert set(out) == expected
    assert out["warped"].shape == (1, *SHAPE, 1) and out["warped"].dtype == tf.float32
    for key in expected - {"warped"}:
        assert out[key].shape == (1, *SHAPE, 3), key
    # heads start at N(0, 1e-5): the transform starts at the identity
    assert np.abs(out["disp"].numpy()).max() < 1e-2
    np.testing.assert_allclose(out["warped"].numpy(), moving, atol=1e-2)
    # zero velocity gives exactly the identity
    for net in patch_fcn.stage_networks(model):
        set_constant_velocity(net, [0.0, 0.0, 0.0])
    out = model([moving, fixed])
    for key in ("disp", "inverse_disp", "velocity"):
        assert np.all(out[key].numpy() == 0.0), key
    np.testing.assert_array_equal(out["warped"].numpy(), moving)


# ------------------------------------------------------------------------------------------------
# The cascade: composition, frozen stages, save / load, init_from
# ------------------------------------------------------------------------------------------------
def test_constant_stage_velocities_compose_to_the_sum():
    model = models.build("patch_fcn", SHAPE, train_stage=2, **TINY)
    c1, c2 = np.array([1.5, -0.5, 0.25]), np.array([-0.75, 2.0, 0.5])
    net1, net2 = patch_fcn.stage_networks(model)
    set_constant_velocity(net1, c1)
    set_constant_velocity(net2, c2)
    out = model(smooth_pair(SHAPE))
    np.testing.assert_allclose(out["disp"].numpy(), np.broadcast_to(c1 + c2, (1, *SHAPE, 3)),
                               atol=1e-5)
    np.testing.assert_allclose(out["inverse_disp"].numpy(),
                               np.broadcast_to(-(c1 + c2), (1, *SHAPE, 3)), atol=1e-5)
    np.testing.assert_allclose(out["velocity"].numpy(), np.broadcast_to(c2, (1, *SHAPE, 3)),
                               atol=1e-6)


def test_cascade_composition_matches_scipy_reference():
    """disp = u2 + u1 o (id + u2) (stage 2 first, CONVENTIONS), inverse in reverse order; the
    model's warped image is the moving image pulled back by it; two sequential warps agree up to
    the second interpolation."""
    keras.utils.set_random_seed(0)
    model = models.build("patch_fcn", SHAPE, train_stage=2, **TINY)
    model.get_layer("stage1").trainable = True
    perturb(model, 0.1, seed=2)
    moving, fixed = smooth_pair(SHAPE, seed=3)
    scale_velocity(model, [moving, fixed], 2.0)  # non-trivial fields of a few voxels
    out = {k: v.numpy()[0] for k, v in model([moving, fixed]).items()}
    u1, u2 = out["disp_stage1"], out["disp_stage2"]
    i1, i2 = out["inverse_disp_stage1"], out["inverse_disp_stage2"]
    # tolerance: float32 round-off of the trilinear weights (the fields are ~2 voxels)
    reference = u2 + map_field(u1, u2)
    np.testing.assert_allclose(out["disp"], reference, atol=1e-5)
    wrong_order = u1 + map_field(u2, u1)
    assert np.abs(out["disp"] - wrong_order).max() > 1000 * 1e-5  # the order is tested
    np.testing.assert_allclose(out["inverse_disp"], i1 + map_field(i2, i1), atol=1e-5)
    np.testing.assert_allclose(out["warped"][..., 0], map_image(moving[0, ..., 0], out["disp"]),
                               atol=1e-5)
    # stage 2 refines the image warped by stage 1: warping twice gives the same image up to the
    # extra interpolation (interior, where no sample left the volume)
    twice = map_image(map_image(moving[0, ..., 0], u1), u2)
    inner = (slice(6, -6),) * 3
    diff = np.abs(twice - out["warped"][..., 0])[inner]
    assert diff.mean() < 0.01, diff.mean()
    # round trip: inverse o forward ~ identity inside (scaling and squaring inverses of fields of
    # 2 voxels: a few % of the displacement over random initialisations; 15% bounds it)
    round_trip = out["disp"] + map_field(out["inverse_disp"], out["disp"])
    assert np.abs(round_trip[inner]).mean() < 0.15 * np.abs(out["disp"][inner]).mean()


def test_frozen_stages_do_not_change_in_a_train_step():
    model = models.build("patch_fcn", SHAPE, train_stage=2, **TINY)
    net1, net2 = patch_fcn.stage_networks(model)
    assert not net1.trainable and net2.trainable
    trainable_ids = {id(w) for w in model.trainable_weights}
    assert trainable_ids == {id(w) for w in net2.trainable_weights}
    before1 = [w.numpy().copy() for w in net1.weights]
    before2 = [w.numpy().copy() for w in net2.weights]
    loss_fn = models.objective(model)
    opt = keras.optimizers.Adam(1e-2)
    moving, fixed = smooth_pair(SHAPE, seed=4)
    with tf.GradientTape() as tape:
        total, _ = loss_fn(moving, fixed, model([moving, fixed], training=True))
    grads = tape.gradient(total, model.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    opt.apply_gradients(zip(grads, model.trainable_weights))
    for w, b in zip(net1.weights, before1):
        np.testing.assert_array_equal(w.numpy(), b)
    assert any(np.any(w.numpy() != b) for w, b in zip(net2.weights, before2))


def test_save_load_init_from_and_load_earlier_stages(tmp_path):
    pair = smooth_pair(SHAPE, seed=6)
    stage1 = models.build("patch_fcn", SHAPE, **TINY)
    perturb(stage1, 0.05, seed=10)
    models.save(stage1, tmp_path / "s1")

    stage2 = models.build("patch_fcn", SHAPE, train_stage=2, init_from=str(tmp_path / "s1"),
                          **TINY)
    first = patch_fcn.stage_networks(stage2)[0]
    for a, b in zip(first.weights, stage1.get_layer("stage1").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # stage 1 of the cascade reproduces the stage-1 model
    np.testing.assert_allclose(stage2(pair)["disp_stage1"].numpy(), stage1(pair)["disp"].numpy(),
                               atol=1e-6)
    perturb(stage2, 0.05, seed=20)
    models.save(stage2, tmp_path / "s2")
    clone = models.load(tmp_path / "s2")
    a, b = stage2(pair), clone(pair)
    for key in ("warped", "disp", "inverse_disp", "velocity"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not clone.get_layer("stage1").trainable

    # The stage-1 directory gone (model shipped elsewhere): loading still works, with a warning.
    shutil.move(tmp_path / "s1", tmp_path / "moved")
    with pytest.warns(UserWarning, match="init_from"):
        again = models.load(tmp_path / "s2")
    np.testing.assert_array_equal(again(pair)["disp"].numpy(), a["disp"].numpy())

    # load_earlier_stages: from the stage-2 model into a fresh stage-3 model (stages 1 and 2)
    stage3 = models.build("patch_fcn", SHAPE, train_stage=3, **TINY)
    assert patch_fcn.load_earlier_stages(stage3, tmp_path / "s2") == 2
    for j in (1, 2):
        for x, y in zip(stage3.get_layer(f"stage{j}").weights,
                        stage2.get_layer(f"stage{j}").weights):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    with pytest.raises(ValueError, match="stages 1..1"):
        patch_fcn.load_earlier_stages(stage3, tmp_path / "moved")
    wide = models.build("patch_fcn", SHAPE, train_stage=2, features=[4, 4, 8, 8, 16])
    with pytest.raises(ValueError, match="features"):
        patch_fcn.load_earlier_stages(wide, tmp_path / "moved")


def test_objective_terms():
    model = models.build("patch_fcn", SHAPE, train_stage=2, lam=0.5, **TINY)
    perturb(model, 0.05, seed=30)
    moving, fixed = smooth_pair(SHAPE, seed=8)
    out = model([moving, fixed])
    total, terms = models.objective(model)(moving, fixed, out)
    sim = losses.NCC(window=7)(fixed, out["warped"])
    reg = losses.OperatorNorm(alpha=0.005)(None, out["velocity_stage2"])
    np.testing.assert_allclose(float(terms["sim"]), float(sim), rtol=1e-6)
    np.testing.assert_allclose(float(terms["operator"]), float(reg), rtol=1e-6)
    np.testing.assert_allclose(float(total), float(sim) + 0.5 * float(reg), rtol=1e-6)


def train_eagerly(model, moving, fixed, steps, lr):
    """Adam on the model's own objective, eager: at 32^3 on CPU this is cheaper than tracing the
    step as a tf.function (the graph build costs more than a dozen eager steps)."""
    loss_fn = models.objective(model)
    opt = keras.optimizers.Adam(lr)
    history = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            total, _ = loss_fn(moving, fixed, model([moving, fixed], training=True))
        opt.apply_gradients(zip(tape.gradient(total, model.trainable_weights),
                                model.trainable_weights))
        history.append(float(total))
    return history


@pytest.mark.slow
def test_training_on_real_volumes_decreases_the_loss(oasis_pair_3d):
    # real OASIS volumes (x4 down-sampled, 32x48x48), central 32^3: the size of the other tests,
    # so the XLA-compiled warps are reused
    moving, fixed = (v[:, 8:40, 8:40] for v in oasis_pair_3d[:2])
    m, f = moving[None, ..., None], fixed[None, ..., None]
    keras.utils.set_random_seed(0)
    model = models.build("patch_fcn", moving.shape, **TINY)
    history = train_eagerly(model, m, f, 10, lr=2e-3)
    assert np.mean(history[-3:]) < history[0] - 0.01, history
    # stage 2 starts from the trained, frozen stage 1: its loss starts where stage 1 ended
    cascade = models.build("patch_fcn", moving.shape, train_stage=2, **TINY)
    cascade.get_layer("stage1").set_weights(model.get_layer("stage1").get_weights())
    end_of_stage1 = float(models.objective(model)(m, f, model([m, f]))[0])
    start_of_stage2 = float(models.objective(cascade)(m, f, cascade([m, f]))[0])
    assert start_of_stage2 == pytest.approx(end_of_stage1, abs=1e-3)
    assert end_of_stage1 < history[0] - 0.01


# ------------------------------------------------------------------------------------------------
# The operator L = -alpha Lap + Id (eq. 3) and its kernel K = (L^T L)^-1 (eq. 4)
# ------------------------------------------------------------------------------------------------
def cosine_field(shape, freqs):
    """Component c: prod_a cos(pi k_ca (i_a + 1/2) / n_a), an exact eigenfunction of the
    reflecting discrete Laplacian with eigenvalue -sum_a (2 - 2 cos(pi k_ca / n_a))."""
    grids = np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")
    comps, eigs = [], []
    for ks in freqs:
        comps.append(np.prod([np.cos(np.pi * k * g / n) for k, g, n in zip(ks, grids, shape)],
                             axis=0))
        eigs.append(sum(2 - 2 * np.cos(np.pi * k / n) for k, n in zip(ks, shape)))
    return np.stack(comps, -1)[None].astype(np.float32), np.array(eigs)


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("spacing", [1.0, 0.5])
def test_operator_norm_on_exact_eigenfunctions(ndims, spacing):
    shape = (12, 10, 8)[:ndims]
    freqs = [(1, 2, 3)[:ndims], (3, 0, 1)[:ndims], (0, 4, 2)[:ndims]][:ndims]
    v, mu = cosine_field(shape, freqs)
    alpha = 0.7
    op = losses.OperatorNorm(alpha=alpha, spacing=spacing)
    gain = 1 + alpha * mu / spacing ** 2  # L v_c = (1 + alpha mu_c / h^2) v_c
    np.testing.assert_allclose(op.apply(v).numpy(), v * gain, rtol=1e-5, atol=1e-5)
    expected = np.mean(np.sum((v * gain) ** 2, axis=-1))
    np.testing.assert_allclose(float(op(None, v)), expected, rtol=1e-5)
    # a wrong sign or a missing alpha would be far off
    for wrong in (1 - alpha * mu / spacing ** 2, 1 + mu / spacing ** 2):
        assert abs(np.mean(np.sum((v * wrong) ** 2, axis=-1)) - expected) > 0.1 * expected


def test_operator_norm_matches_the_continuous_laplacian_of_sines():
    """v = sin fields: -Lap v = |k|^2 v analytically; the 7-point stencil agrees to O(h^2 k^2)
    in the interior (where the reflecting faces play no role)."""
    shape = (40, 36, 32)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    k = 2 * np.pi / np.array([20.0, 18.0, 16.0])
    v = np.stack([np.sin(k[0] * x) * np.sin(k[1] * y), np.sin(k[2] * z),
                  np.sin(k[0] * x + k[2] * z)], -1)
    lap = -np.stack([(k[0] ** 2 + k[1] ** 2) * v[..., 0], k[2] ** 2 * v[..., 1],
                     (k[0] ** 2 + k[2] ** 2) * v[..., 2]], -1)
    alpha = 3.0
    expected = v - alpha * lap
    got = losses.OperatorNorm(alpha=alpha).apply(v[None].astype(np.float32)).numpy()[0]
    inner = (slice(1, -1),) * 3
    # discretisation error of the stencil: alpha sum_a k_a^2 (k_a h)^2 / 12 < 0.01 here
    np.testing.assert_allclose(got[inner], expected[inner], atol=0.02)
    assert np.abs(expected - v).max() > 0.5  # the Laplacian term is 25x the tolerance here


def test_operator_norm_basics():
    field = RNG.standard_normal((2, 9, 8, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(float(losses.OperatorNorm(alpha=0.0)(None, field)),
                               np.mean(np.sum(field.astype(np.float64) ** 2, -1)), rtol=1e-5)
    constant = np.ones((1, 6, 5, 4, 3), np.float32) * np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(float(losses.OperatorNorm(alpha=5.0)(None, constant)), 5.25,
                               rtol=1e-6)  # Lap of a constant is 0 (faces too)
    op = losses.get("operator", alpha=0.3, spacing=2.0)
    assert isinstance(op, losses.OperatorNorm)
    clone = losses.OperatorNorm.from_config(op.get_config())
    assert clone.get_config() == op.get_config()
    half = tf.constant(field, tf.float16)
    np.testing.assert_allclose(float(op(None, half)), float(op(None, half.numpy().astype(
        np.float32))), rtol=1e-6)
    for bad in ({"alpha": -1.0}, {"spacing": 0.0}):
        with pytest.raises(ValueError):
            losses.OperatorNorm(**bad)
    with pytest.raises(ValueError, match="rank|2 or 3"):
        losses.OperatorNorm()(None, np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("ndims", [2, 3])
def test_kernel_inverts_the_operator_and_sobolev_gradient(ndims):
    shape = (11, 9, 8)[:ndims]
    alpha, spacing = 0.8, 0.7
    v = RNG.standard_normal((2, *shape, ndims)).astype(np.float32)
    op = losses.OperatorNorm(alpha=alpha, spacing=spacing)
    np.testing.assert_allclose(patch_fcn.apply_kernel(op.apply(op.apply(v)), alpha, spacing)
                               .numpy(), v, atol=2e-4)
    const = np.ones((1, *shape, ndims), np.float32)
    np.testing.assert_allclose(patch_fcn.apply_kernel(const, alpha).numpy(), const, atol=1e-5)
    # the layer: identity forward, K applied to the gradient
    layer = patch_fcn.SobolevGradient(alpha, spacing)
    upstream = tf.constant(RNG.standard_normal(v.shape).astype(np.float32))
    x = tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * upstream)
    np.testing.assert_array_equal(y.numpy(), v)
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(grad, patch_fcn.apply_kernel(upstream, alpha, spacing).numpy(),
                               atol=1e-6)
    assert np.linalg.norm(grad) < 0.8 * np.linalg.norm(upstream.numpy())  # a low-pass filter
    # eq. 4: K applied to dL/dv of (sim + lam ||Lv||^2) gives K dsim/dv + 2 lam v
    lam = 0.3
    with tf.GradientTape() as tape:
        tape.watch(x)
        reg = lam * tf.reduce_sum(tf.square(op.apply(layer(x))))
    np.testing.assert_allclose(tape.gradient(reg, x).numpy(), 2 * lam * v, atol=2e-4)


# ------------------------------------------------------------------------------------------------
# Patch sampling (training)
# ------------------------------------------------------------------------------------------------
def box_pair(shape=(40, 36, 30)):
    fixed = np.zeros(shape, np.float32)
    fixed[10:30, 8:28, 5:25] = RNG.uniform(0.2, 1.0, (20, 20, 20))
    moving = np.roll(fixed, 2, axis=0) * 0.9
    return moving, fixed


def test_sample_patch_pairs_splits_foreground_and_background():
    moving, fixed = box_pair()
    p = 16
    m, f, centres, fg = patches.sample_patch_pairs(moving, fixed, p, count=7, seed=3)
    assert m.shape == f.shape == (7, p, p, p) and m.dtype == np.float32
    assert fg.sum() == 4 and (~fg).sum() == 3  # ceil / floor of half
    mask = patches.foreground_mask(moving, fixed)
    assert np.all(mask[tuple(centres.T)] == fg)
    padded_m, padded_f = np.pad(moving, p), np.pad(fixed, p)
    for i, c in enumerate(centres):
        window = tuple(slice(a - p // 2 + p, a - p // 2 + 2 * p) for a in c)
        np.testing.assert_array_equal(m[i], padded_m[window])
        np.testing.assert_array_equal(f[i], padded_f[window])
    again = patches.sample_patch_pairs(moving, fixed, p, count=7, seed=3)
    np.testing.assert_array_equal(again[2], centres)
    other = patches.sample_patch_pairs(moving, fixed, p, count=7, seed=4)
    assert np.any(other[2] != centres)
    # no background at all: every centre from the foreground
    full = np.full((20, 20, 20), 0.5, np.float32)
    _, _, c_full, fg_full = patches.sample_patch_pairs(full, full, 8, count=4, seed=0)
    assert fg_full.all() and c_full.shape == (4, 3)


def test_patch_pair_dataset_batches_patches_of_pairs():
    images = np.stack([box_pair((32, 32, 32))[1] for _ in range(3)])
    ds = patches.patch_pair_dataset(images, patch_size=16, patches_per_pair=2, batch_size=4,
                                    seed=1)
    first = [(m.numpy(), f.numpy()) for m, f in ds.take(2)]
    for m, f in first:
        assert m.shape == f.shape == (4, 16, 16, 16, 1) and m.dtype == np.float32
    again = [(m.numpy(), f.numpy()) for m, f in ds.take(2)]
    for (m1, f1), (m2, f2) in zip(first, again):
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(f1, f2)
    # a dataset of (moving, fixed) batches works too
    from mdregnet import data

    pairs = data.pair_dataset(images, batch_size=2, seed=0)
    m, f = next(iter(patches.patch_pair_dataset(pairs, 16, patches_per_pair=2, batch_size=4)))
    assert m.shape == (4, 16, 16, 16, 1)


# ------------------------------------------------------------------------------------------------
# Patch inference: tiling and stitching
# ------------------------------------------------------------------------------------------------
def pointwise_net(ndims=3):
    """A 'network' whose output at p is (moving(p), fixed(p), moving(p) + fixed(p))."""
    m = keras.Input((None,) * ndims + (1,))
    f = keras.Input((None,) * ndims + (1,))
    out = keras.layers.Concatenate()([m, f, keras.layers.Add()([m, f])])
    return keras.Model([m, f], out)


def conv_net(kernel, seed=0):
    """A fixed random 'same' convolution of the pair (receptive radius kernel // 2)."""
    m = keras.Input((None, None, None, 1))
    f = keras.Input((None, None, None, 1))
    conv = keras.layers.Conv3D(3, kernel, padding="same",
                               kernel_initializer=keras.initializers.RandomNormal(seed=seed),
                               bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))
    return keras.Model([m, f], conv(keras.layers.Concatenate()([m, f])))


def test_stitching_puts_every_voxel_in_its_place():
    shape = (37, 29, 18)  # no size a multiple of keep: the last tiles stick out
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    moving = grid[0] + 100 * grid[1]
    fixed = grid[2] + 1000.0
    for patch, keep in ((16, 8), (16, 6), (16, 16)):
        out = patches.predict_by_patches(pointwise_net(), moving, fixed, patch, keep,
                                         batch_size=5)
        assert out.shape == (1, *shape, 3)
        np.testing.assert_array_equal(out[0], np.stack([moving, fixed, moving + fixed], -1))
    starts, n_tiles = patches.tile_starts(shape, 16, 6)
    assert n_tiles == [7, 5, 3] and len(starts) == 105 and starts[0] == (-5, -5, -5)


def test_stitched_local_network_equals_the_whole_volume_run():
    """A network whose receptive radius fits in the margin gives exactly its whole-volume output
    (the zero padding of the patches at the faces is the convolution's own zero padding)."""
    shape = (37, 29, 18)
    moving, fixed = (x[0, ..., 0] for x in smooth_pair(shape, seed=9))
    net = conv_net(kernel=5)
    whole = net([moving[None, ..., None], fixed[None, ..., None]]).numpy()
    stitched = patches.predict_by_patches(net, moving, fixed, 16, 8)  # margin 4 >= radius 2
    np.testing.assert_allclose(stitched, whole, atol=1e-5)
    too_small = patches.predict_by_patches(net, moving, fixed, 16, 14)  # margin 1 < radius 2
    assert np.abs(too_small - whole).max() > 1e-2  # the test sees missing context


def test_register_by_patches_with_constant_stage_velocities():
    model = models.build("patch_fcn", SHAPE, train_stage=2, **TINY)
    c1, c2 = np.array([0.5, -1.0, 0.25]), np.array([1.0, 0.5, -0.75])
    net1, net2 = patch_fcn.stage_networks(model)
    set_constant_velocity(net1, c1)
    set_constant_velocity(net2, c2)
    shape = (40, 35, 21)  # any size: the patches carry the padding
    moving, fixed = (x[0, ..., 0] for x in smooth_pair(shape, seed=12))
    out = patches.register_by_patches(model, moving, fixed, patch_size=32, keep=16,
                                      batch_size=9)
    np.testing.assert_allclose(out["velocity_stage1"].numpy()[0], np.broadcast_to(c1, (*shape, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(out["disp"].numpy()[0], np.broadcast_to(c1 + c2, (*shape, 3)),
                               atol=1e-5)
    np.testing.assert_allclose(out["inverse_disp"].numpy()[0],
                               np.broadcast_to(-(c1 + c2), (*shape, 3)), atol=1e-5)
    np.testing.assert_allclose(out["warped"].numpy()[0, ..., 0], map_image(moving, out["disp"]
                                                                           .numpy()[0]),
                               atol=1e-5)
    # the same as the model's own whole-volume output on a size it takes
    pair = smooth_pair(SHAPE, seed=13)
    whole = model(pair)
    by_patches = patches.register_by_patches(model, pair[0], pair[1], patch_size=32, keep=16,
                                             batch_size=8)
    for key in ("disp", "inverse_disp", "warped"):
        np.testing.assert_allclose(by_patches[key].numpy(), whole[key].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="patch_fcn"):
        patches.register_by_patches(models.build("voxelmorph", SHAPE), moving, fixed)


def test_register_by_patches_stage_one_equals_stitching_then_integration():
    model = models.build("patch_fcn", SHAPE, **TINY)
    perturb(model, 0.1, seed=40)
    moving, fixed = (x[0, ..., 0] for x in smooth_pair((40, 35, 21), seed=14))
    out = patches.register_by_patches(model, moving, fixed, patch_size=32, keep=16, batch_size=9)
    v = patches.predict_by_patches(model.get_layer("stage1"), moving, fixed, 32, 16, batch_size=9)
    np.testing.assert_array_equal(out["velocity"].numpy(), v)
    np.testing.assert_allclose(out["disp"].numpy(), layers.integrate_svf(v, 7).numpy(), atol=1e-6)
