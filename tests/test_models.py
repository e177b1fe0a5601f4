"""The model factory: every registered method through one code path."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from mdregnet import layers, metrics, models

RNG = np.random.default_rng(7)
ALL = models.available()
DIFFEO = [n for n in ALL if models.get_method(n).diffeomorphic]


def small_shape(name, ndims):
    d = models.get_method(name).divisor
    base = (32, 32, 32) if ndims == 3 else (64, 64)
    return tuple(max(d, n) for n in base)


def random_pair(shape, batch=1):
    from scipy import ndimage

    imgs = [ndimage.gaussian_filter(RNG.random((batch, *shape, 1)), [0] + [2] * len(shape) + [0])
            for _ in range(2)]
    return [((i - i.min()) / (i.max() - i.min())).astype(np.float32) for i in imgs]


def test_available_lists_the_seed_methods():
    for name in ("mdregnet", "voxelmorph", "prdfe", "pdfe", "iprdfe", "fcn_ds"):
        assert name in ALL


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as err:
        models.build("no-such-model", (32, 32, 32))
    for name in ALL:
        assert name in str(err.value)


def test_unknown_hparam_and_bad_shape():
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        models.build("mdregnet", (32, 32, 32), lamda=0.3)
    with pytest.raises(ValueError, match="divisible by 16"):
        models.build("mdregnet", (32, 30, 32))


@pytest.mark.parametrize("ndims", [3, 2])
@pytest.mark.parametrize("name", ALL)
def test_build_shapes_and_finite_gradients(name, ndims):
    shape = small_shape(name, ndims)
    model = models.build(name, shape)
    loss_fn = models.objective(model)
    moving, fixed = random_pair(shape, batch=2)
    with tf.GradientTape() as tape:
        out = model([moving, fixed], training=True)
        total, terms = loss_fn(moving, fixed, out)
    assert out["warped"].shape == (2, *shape, 1) and out["warped"].dtype == tf.float32
    assert out["disp"].shape == (2, *shape, ndims)
    if models.get_method(name).diffeomorphic:
        assert out["inverse_disp"].shape == (2, *shape, ndims)
        assert "velocity" in out
    assert total.shape == () and np.isfinite(total.numpy())
    for value in terms.values():
        assert np.isfinite(float(value))
    grads = tape.gradient(total, model.trainable_weights)
    assert len(grads) == len(model.trainable_weights) > 0
    for w, g in zip(model.trainable_weights, grads):
        assert g is not None, w.path
        assert np.all(np.isfinite(g.numpy())), w.path


def conv_params(k, ndims, cin, cout):
    return k ** ndims * cin * cout + cout


def expected_mdregnet_params(ndims):
    """Independent count from the paper's layer list (Network Architecture, Fig. 1b)."""
    total = 0
    for level in (1, 2, 3):
        enc = [(2, 16), (16, 32), (32, 32), (32, 32)]
        n = sum(conv_params(3, ndims, a, b) for a, b in enc)
        # l deconvs of 32 filters; input channels: bottleneck 32, then 32 + skip 32 = 64
        skip_channels = [32, 32, 16]  # encoder features at 1/8, 1/4, 1/2
        cin = 32
        for i in range(level):
            n += conv_params(3, ndims, cin, 32)
            cin = 32 + skip_channels[i]
        n += conv_params(3, ndims, cin, 32) + conv_params(3, ndims, 32, 16)
        n += conv_params(3, ndims, 16, ndims)
        total += n
    return total


def expected_voxelmorph_params(ndims):
    enc = [(2, 16), (16, 32), (32, 32), (32, 32)]
    n = sum(conv_params(3, ndims, a, b) for a, b in enc)
    dec_in = [32, 32 + 32, 32 + 32, 32 + 16, 32, 32 + 2, 16]
    dec_out = [32, 32, 32, 32, 32, 16, 16]
    n += sum(conv_params(3, ndims, a, b) for a, b in zip(dec_in, dec_out))
    return n + conv_params(3, ndims, 16, ndims)


@pytest.mark.parametrize("ndims", [2, 3])
def test_parameter_counts_match_the_papers(ndims):
    shape = (32,) * ndims
    assert models.build("mdregnet", shape).count_params() == expected_mdregnet_params(ndims)
    assert models.build("voxelmorph", shape).count_params() == expected_voxelmorph_params(ndims)


def test_mdregnet_level_grids():
    model = models.build("mdregnet", (64, 48, 32))
    out = model(random_pair((64, 48, 32)))
    assert out["velocity_level1"].shape == (1, 8, 6, 4, 3)  # 1/8
    assert out["velocity_level2"].shape == (1, 16, 12, 8, 3)  # 1/4
    assert out["velocity_level3"].shape == (1, 32, 24, 16, 3)  # 1/2
    assert out["warped_level1"].shape == (1, 8, 6, 4, 1)
    assert out["warped_fixed_level2"].shape == (1, 16, 12, 8, 1)
    assert out["velocity"].shape == (1, 64, 48, 32, 3)


def set_constant_velocity(model, name, value):
    """Makes the network output a constant SVF by zeroing the output kernel and setting the bias."""
    for layer in model.layers:
        if layer.name.endswith(name):
            kernel, bias = layer.get_weights()
            layer.set_weights([np.zeros_like(kernel), np.asarray(value, np.float32)])


def test_mdregnet_translation_accumulates_across_levels():
    """Constant SVFs c1 at 1/8 and c2 at 1/4 give v~ = 4*c1... i.e. fine-voxel translation
    8*c1 + 4*c2 (magnitude scaling of RescaleTransform), and warped = moving shifted by it."""
    shape = (32, 32, 32)
    model = models.build("mdregnet", shape, smoothing="none")
    set_constant_velocity(model, "S1_svf", [0.25, 0.0, 0.0])
    set_constant_velocity(model, "S2_svf", [0.0, -0.25, 0.0])
    set_constant_velocity(model, "S3_svf", [0.0, 0.0, 0.5])
    out = model(random_pair(shape))
    expect = np.array([0.25 * 8, -0.25 * 4, 0.5 * 2])  # voxels at full resolution
    inner = (0, slice(4, -4), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out["disp"].numpy()[inner], np.broadcast_to(expect, (24, 24, 24, 3)),
                               atol=1e-4)
    np.testing.assert_allclose(out["inverse_disp"].numpy()[inner], -np.broadcast_to(expect,
                                                                                     (24, 24, 24, 3)),
                               atol=1e-4)


def test_mdregnet_int_downsize_integrates_on_the_half_grid():
    """int_downsize=2: the SVF of level 3 is integrated on its 1/2 grid ('velocity' there) and the
    displacement resized WITH magnitude scaling, so a constant SVF still translates by the same
    full-resolution voxels, and a smooth field matches the paper's full-resolution integration
    (same weights) to a small fraction of its size; a factor that does not divide 2 is refused."""
    shape = (32, 32, 32)
    model = models.build("mdregnet", shape, smoothing="none", int_downsize=2)
    set_constant_velocity(model, "S1_svf", [0.25, 0.0, 0.0])
    set_constant_velocity(model, "S2_svf", [0.0, -0.25, 0.0])
    set_constant_velocity(model, "S3_svf", [0.0, 0.0, 0.5])
    out = model(random_pair(shape))
    assert out["velocity"].shape == (1, 16, 16, 16, 3)
    assert out["disp"].shape == (1, 32, 32, 32, 3)
    expect = np.array([0.25 * 8, -0.25 * 4, 0.5 * 2])
    inner = (0, slice(4, -4), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out["disp"].numpy()[inner], np.broadcast_to(expect, (24, 24, 24, 3)),
                               atol=1e-4)
    np.testing.assert_allclose(out["inverse_disp"].numpy()[inner],
                               -np.broadcast_to(expect, (24, 24, 24, 3)), atol=1e-4)

    paper = models.build("mdregnet", shape)
    fast = models.build("mdregnet", shape, int_downsize=2)
    weights = [w + RNG.normal(0.0, 0.05, w.shape).astype(np.float32)
               for w in paper.get_weights()]
    paper.set_weights(weights)
    fast.set_weights(weights)
    pair = random_pair(shape)
    disp_paper = paper(pair)["disp"].numpy()[inner]
    disp_fast = fast(pair)["disp"].numpy()[inner]
    size = np.abs(disp_paper).max()
    assert size > 0.5  # a real field, or the comparison proves nothing
    assert np.abs(disp_fast - disp_paper).max() < 0.1 * size
    with pytest.raises(ValueError, match="int_downsize"):
        models.build("mdregnet", shape, int_downsize=4)


@pytest.mark.parametrize("name", ALL)
def test_save_load_identical_outputs(name, tmp_path):
    shape = small_shape(name, 3)
    model = models.build(name, shape)
    # perturb the weights so that outputs are not trivially ~0
    for w in model.trainable_weights:
        w.assign(w + tf.random.normal(w.shape, stddev=0.01, seed=1))
    pair = random_pair(shape)
    models.save(model, tmp_path / "m", extra={"note": "test"})
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.weights.h5"]
    clone = models.load(tmp_path / "m")
    a, b = model(pair), clone(pair)
    for key in ("warped", "disp"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert clone.mdregnet_config["extra"] == {"note": "test"}


def test_load_refuses_tampered_config(tmp_path):
    model = models.build("voxelmorph", (32, 32, 32))
    models.save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["name"] = "os.system"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: unknown model"):
        models.load(tmp_path)
    config["name"] = "voxelmorph"
    config["hparams"]["lam"] = {"__class__": "subprocess.Popen"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="plain JSON"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        models.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# Real data: a short training run per model on a real 2D pair
# ------------------------------------------------------------------------------------------------
STEPS = {"mdregnet": 150, "voxelmorph": 150}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mdregnet", "voxelmorph"])  # the others: test_<model>.py
def test_training_on_real_slices_improves_dice(name, oasis_slices, fit_pair):
    moving, fixed, moving_seg, fixed_seg = oasis_slices
    d = models.get_method(name).divisor
    h, w = (moving.shape[0] // d) * d, (moving.shape[1] // d) * d
    crop = lambda a: a[:h, :w][None, ..., None]  # noqa: E731
    m, f, ms, fs = crop(moving), crop(fixed), crop(moving_seg), crop(fixed_seg)
    model = models.build(name, (h, w))
    losses = fit_pair(model, m, f, STEPS.get(name, 150), lr=1e-3)
    assert np.mean(losses[-10:]) < losses[0] - 0.1 * abs(losses[0]), (losses[0], losses[-10:])
    out = model([m, f])
    warped_seg = layers.warp(ms, out["disp"], interp_method="nearest").numpy()
    _, dice_before = metrics.dice(fs[0, ..., 0], ms[0, ..., 0])
    _, dice_after = metrics.dice(fs[0, ..., 0], warped_seg[0, ..., 0])
    assert dice_after > dice_before + 0.03, (dice_before, dice_after)
    if models.get_method(name).diffeomorphic:
        assert metrics.folding(out["disp"].numpy()[0])["count"] == 0
        ic = metrics.inverse_consistency(out["disp"].numpy(), out["inverse_disp"].numpy())
        assert ic["mean"] < 0.1 * np.abs(out["disp"].numpy()).mean() + 0.05, ic


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mdregnet", "voxelmorph"])
def test_short_3d_training_on_real_volumes(name, oasis_pair_3d, fit_pair):
    moving, fixed, moving_seg, fixed_seg = oasis_pair_3d
    m, f = moving[None, ..., None], fixed[None, ..., None]
    model = models.build(name, moving.shape)
    losses = fit_pair(model, m, f, 40, lr=1e-3)
    assert np.mean(losses[-5:]) < losses[0] - 0.02 * abs(losses[0]), (losses[0], losses[-5:])
    out = model([m, f])
    assert metrics.folding(out["disp"].numpy()[0])["count"] == 0
