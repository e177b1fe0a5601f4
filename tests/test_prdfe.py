"""PRDFE, PDFE and IPRDFE (Zhou et al., `../shared/papers/prdfe.md`).

Shapes, gradients, parameter counts from the paper's layer list, eqs. 3-4 on known fields,
save/load, and a short training run on real slices.
"""

import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

import mdregnet.models.registry
from mdregnet import layers, metrics
from mdregnet.models import prdfe  # registers prdfe, pdfe, iprdfe

build = mdregnet.models.registry.build
objective = mdregnet.models.registry.objective

NAMES = ["prdfe", "pdfe", "iprdfe"]
SHAPES = {2: (64, 64), 3: (32, 32, 32)}
RNG = np.random.default_rng(11)


def smooth_pair(shape, batch=1):
    from scipy import ndimage

    out = []
    for _ in range(2):
        x = ndimage.gaussian_filter(RNG.random((batch, *shape, 1)), [0] + [2] * len(shape) + [0])
        out.append(((x - x.min()) / (x.max() - x.min())).astype(np.float32))
    return out


def flow_heads(model):
    """{k: layer} of the flow heads G_k -> field."""
    return {int(layer.name[1:-5]): layer for layer in model.layers
            if layer.name.startswith("g") and layer.name.endswith("_flow")}


def set_constant_flows(model, constants):
    """Zero every head's kernel and set its bias: G_k outputs the constant `constants[k]`."""
    for k, layer in flow_heads(model).items():
        kernel, bias = layer.get_weights()
        value = np.asarray(constants.get(k, np.zeros_like(bias)), np.float32)
        layer.set_weights([np.zeros_like(kernel), value])


# ------------------------------------------------------------------------------------------------
# Registration and defaults
# ------------------------------------------------------------------------------------------------
def test_registered_with_the_papers_brain_settings():
    for name in NAMES:
        method = mdregnet.models.registry.get_method(name)
        hp = method.defaults
        assert method.divisor == 16 and method.diffeomorphic is False
        assert hp["dec_features"] == [40, 40, 40, 40, 40, 24, 24]
        assert hp["lam"] == 0.001 and hp["penalty"] == "l2"
        json.dumps(hp)  # JSON-only hyper-parameters (save/load rebuilds from them)
    for name in ("prdfe", "pdfe"):
        assert mdregnet.models.registry.defaults(name)["enc_features"] == [24, 40, 40, 40]
    assert "enc_features" not in mdregnet.models.registry.defaults("iprdfe")


def test_decoder_layout_follows_voxelmorph2():
    assert prdfe.decoder_layout([40, 40, 40, 40, 40, 24, 24], 5) == {
        5: [40], 4: [40], 3: [40], 2: [40, 40], 1: [24, 24]}
    assert prdfe.decoder_layout([8, 8, 8, 4], 3) == {3: [8], 2: [8, 8], 1: [4]}
    with pytest.raises(ValueError, match="dec_features"):
        prdfe.decoder_layout([8, 8, 8], 3)


def test_bad_hparams_and_shapes():
    with pytest.raises(ValueError, match="downsample"):
        build("prdfe", (64, 64), downsample="avg")
    with pytest.raises(ValueError, match="dec_features"):
        build("prdfe", (64, 64), dec_features=[40, 40, 40, 40, 24])
    with pytest.raises(ValueError, match="divisible by 16"):
        build("iprdfe", (64, 56))


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_gradients(name, ndims):
    shape = SHAPES[ndims]
    model = build(name, shape)
    loss_fn = objective(model)
    moving, fixed = smooth_pair(shape, batch=2)
    with tf.GradientTape() as tape:
        out = model([moving, fixed], training=True)
        total, terms = loss_fn(moving, fixed, out)
    assert out["warped"].shape == (2, *shape, 1) and out["warped"].dtype == tf.float32
    assert out["disp"].shape == (2, *shape, ndims) and out["disp"].dtype == tf.float32
    for k in range(1, 6):  # level k lives on a grid 2^(k-1) times coarser
        assert out[f"flow_level{k}"].shape == (2, *[n // 2 ** (k - 1) for n in shape], ndims)
        if k < 5:
            assert out[f"total_level{k}"].shape == out[f"flow_level{k}"].shape
    assert "total_level5" not in out
    assert total.shape == () and total.dtype == tf.float32 and np.isfinite(total.numpy())
    assert set(terms) == {"sim", "grad"}
    np.testing.assert_allclose(float(terms["sim"]), np.mean((fixed - out["warped"].numpy()) ** 2),
                               rtol=1e-5)
    grads = tape.gradient(total, model.trainable_weights)
    assert len(grads) == len(model.trainable_weights) > 0
    for w, g in zip(model.trainable_weights, grads):
        assert g is not None, w.path
        g = g.numpy()
        assert np.all(np.isfinite(g)), w.path
        # Flow heads start at N(0, 1e-5), so gradients behind them are tiny (down to ~1e-29 for
        # PDFE's coarsest level, reached only through four heads and warps) but must not vanish.
        assert np.any(g != 0), w.path


# ------------------------------------------------------------------------------------------------
# Parameter counts, independently from the paper's layer sizes (Sec. III-D, brain data)
# ------------------------------------------------------------------------------------------------
def conv_params(cin, cout, ndims, k=3):
    return k ** ndims * cin * cout + cout


def expected_params(name, ndims, decoder_context=False):
    enc = [24, 40, 40, 40]
    total = 0
    if name != "iprdfe":  # shared descriptor, counted once: 1->24->40->40->40
        total += sum(conv_params(a, b, ndims) for a, b in zip([1] + enc[:-1], enc))
        chans = {1: 1, 2: 24, 3: 40, 4: 40, 5: 40}  # channels of FE_k (FE_1 = the image)
    else:
        chans = {k: 1 for k in range(1, 6)}  # image pyramid
    # G_k: [fixed, warped moving] (+ the up-sampled last features of G_{k+1} with context)
    g = {5: [40], 4: [40], 3: [40], 2: [40, 40], 1: [24, 24]}
    for k in range(5, 0, -1):
        cin = 2 * chans[k] + (g[k + 1][-1] if decoder_context and k < 5 else 0)
        for cout in g[k]:
            total += conv_params(cin, cout, ndims)
            cin = cout
        total += conv_params(cin, ndims, ndims)  # flow head
    return total


@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_paper(name, ndims):
    model = build(name, SHAPES[ndims])
    assert model.count_params() == expected_params(name, ndims)
    assert len(model.non_trainable_weights) == 0


def test_parameter_counts_known_values_and_options():
    # Hand-checked totals (2D / 3D) of the paper's brain setting.
    assert expected_params("prdfe", 2) == 165066
    assert expected_params("prdfe", 3) == 499367
    assert expected_params("iprdfe", 3) == 83855
    # The descriptor alone: 3^3 * (1*24 + 24*40 + 40*40 + 40*40) + (24 + 40 + 40 + 40).
    model = build("prdfe", SHAPES[3])
    assert model.get_layer("descriptor").count_params() == 27 * 4184 + 144
    for downsample in ("stride", "maxpool"):  # same weights, different down-sampling
        m = build("prdfe", SHAPES[2], downsample=downsample)
        assert m.count_params() == expected_params("prdfe", 2)
    m = build("prdfe", SHAPES[2], decoder_context=True)
    assert m.count_params() == expected_params("prdfe", 2, decoder_context=True)


def test_descriptor_weights_are_shared():
    model = build("prdfe", SHAPES[2])
    descriptor = model.get_layer("descriptor")
    moving, fixed = smooth_pair(SHAPES[2])
    fe = descriptor(moving)
    assert [tuple(f.shape) for f in fe] == [(1, 32, 32, 24), (1, 16, 16, 40), (1, 8, 8, 40),
                                            (1, 4, 4, 40)]
    # Same input twice -> identical features: one set of weights serves both streams.
    np.testing.assert_array_equal(descriptor(moving)[0].numpy(), fe[0].numpy())
    assert not any(layer.name.startswith("fe") for layer in model.layers)


# ------------------------------------------------------------------------------------------------
# Known fields
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ndims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_zero_field_gives_identity(name, ndims):
    shape = SHAPES[ndims]
    model = build(name, shape)
    set_constant_flows(model, {})
    moving, fixed = smooth_pair(shape)
    out = model([moving, fixed])
    np.testing.assert_array_equal(out["disp"].numpy(), 0.0)
    # Sampling at integer coordinates: exact up to float rounding.
    np.testing.assert_allclose(out["warped"].numpy(), moving, atol=1e-6)


# Constant residuals c_k (level-k voxels): 0.25 at 1/16, -0.5 at 1/4 (axis 1), 1 at full res.
CONSTANTS_2D = {5: [0.25, 0.0], 3: [0.0, -0.5], 1: [1.0, 0.0]}


@pytest.mark.parametrize("name", ["prdfe", "iprdfe"])
def test_eqs_3_4_accumulate_with_magnitude_scaling_once(name):
    """Eq. 4: phi = sum_k 2^(k-1) up(c_k) = [16*0.25 + 1, 4*(-0.5)] = [5, -2] fine voxels; eq. 3
    at each level k: sum over j > k of 2^(j-k) c_j. A double scaling (rescale AND multiply) would
    give 16*16*0.25 = 64; a missing one 0.25."""
    shape = SHAPES[2]
    model = build(name, shape)
    set_constant_flows(model, CONSTANTS_2D)
    moving, fixed = smooth_pair(shape)
    out = model([moving, fixed])
    c = {k: np.asarray(CONSTANTS_2D.get(k, [0.0, 0.0])) for k in range(1, 6)}
    for k in range(1, 5):
        want = sum(2.0 ** (j - k) * c[j] for j in range(k + 1, 6))
        np.testing.assert_allclose(out[f"total_level{k}"].numpy(),
                                   np.broadcast_to(want, out[f"total_level{k}"].shape), atol=1e-5)
    np.testing.assert_allclose(out["disp"].numpy(), np.broadcast_to([5.0, -2.0], (1, *shape, 2)),
                               atol=1e-5)
    # warped(p) = moving(p + (5, -2)), away from the borders.
    warped = out["warped"].numpy()[0, ..., 0]
    np.testing.assert_allclose(warped[:-5, 2:], moving[0, 5:, :-2, 0], atol=1e-5)


def test_eqs_3_4_constant_residuals_3d():
    shape = SHAPES[3]
    model = build("prdfe", shape)
    set_constant_flows(model, {4: [0.0, 0.0, 0.5], 2: [0.25, 0.0, 0.0], 1: [0.0, 1.0, 0.0]})
    out = model(smooth_pair(shape))
    np.testing.assert_allclose(out["disp"].numpy(), np.broadcast_to([0.5, 1.0, 4.0],
                                                                     (1, *shape, 3)), atol=1e-5)
    np.testing.assert_allclose(out["total_level1"].numpy(),
                               np.broadcast_to([0.5, 0.0, 4.0], (1, *shape, 3)), atol=1e-5)


def test_eq_4_on_random_fields_is_one_resample_per_level():
    """With trained-looking (non-constant) residuals, disp = sum_j rescale(flow_j, 2^(j-1))."""
    shape = SHAPES[2]
    model = build("prdfe", shape, flow_init_stddev=0.05)
    out = model(smooth_pair(shape))
    want = out["flow_level1"].numpy()
    for j in range(2, 6):
        want = want + layers.rescale_field(out[f"flow_level{j}"], 2 ** (j - 1)).numpy()
    assert np.abs(out["flow_level5"].numpy()).max() > 1e-3  # the test is not vacuous
    np.testing.assert_allclose(out["disp"].numpy(), want, atol=1e-5)


@pytest.mark.parametrize("scale_magnitude", [True, False])
def test_pdfe_outputs_the_finest_total_field(scale_magnitude):
    shape = SHAPES[2]
    model = build("pdfe", shape, scale_magnitude=scale_magnitude)
    set_constant_flows(model, CONSTANTS_2D)
    out = model(smooth_pair(shape))
    # No accumulation: the output is G_1's field; each level warps with the next coarser one.
    np.testing.assert_allclose(out["disp"].numpy(), np.broadcast_to([1.0, 0.0], (1, *shape, 2)),
                               atol=1e-6)
    factor = 2.0 if scale_magnitude else 1.0
    np.testing.assert_allclose(out["total_level4"].numpy(),
                               np.broadcast_to([0.25 * factor, 0.0], (1, 8, 8, 2)), atol=1e-6)
    np.testing.assert_allclose(out["total_level2"].numpy(),
                               np.broadcast_to([0.0, -0.5 * factor], (1, 32, 32, 2)), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Save / load from JSON hyper-parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    shape = SHAPES[2]
    hp = json.loads(json.dumps(mdregnet.models.registry.defaults(name)))
    hp["flow_init_stddev"] = 0.01
    model = build(name, shape, **hp)
    mdregnet.models.registry.save(model, str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["hparams"] == hp
    loaded = mdregnet.models.registry.load(str(tmp_path))
    pair = smooth_pair(shape)
    np.testing.assert_allclose(loaded(pair)["disp"].numpy(), model(pair)["disp"].numpy(),
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Short training on a real pair of OASIS slices
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_training_on_oasis_slices_improves_loss_and_dice(name, oasis_slices):
    moving, fixed, moving_seg, fixed_seg = oasis_slices  # 160x192, divisible by 16: no cropping
    assert moving.shape == (160, 192)
    shape = moving.shape
    tf.keras.utils.set_random_seed(0)
    model = build(name, shape)
    loss_fn = objective(model)
    m, f = moving[None, ..., None], fixed[None, ..., None]
    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = model([m, f], training=True)
            total, terms = loss_fn(m, f, out)
        grads = tape.gradient(total, model.trainable_weights)
        optimizer.apply_gradients(zip(grads, model.trainable_weights))
        return total

    first, _ = loss_fn(m, f, model([m, f]))
    start = time.time()
    for _ in range(200):
        step()
    elapsed = time.time() - start
    out = model([m, f])
    last, terms = loss_fn(m, f, out)
    warped_seg = layers.warp(moving_seg[None, ..., None], out["disp"],
                             interp_method="nearest").numpy()[0, ..., 0]
    before = metrics.dice(fixed_seg, moving_seg)[1]
    after = metrics.dice(fixed_seg, warped_seg)[1]
    print(f"{name} 200 steps in {elapsed:.1f}s: loss {float(first):.5f} -> {float(last):.5f}, "
          f"Dice {before:.3f} -> {after:.3f}")
    assert float(last) < 0.7 * float(first)
    assert after > before + 0.03
