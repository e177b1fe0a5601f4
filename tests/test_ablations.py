"""`experiments/ablation_*.py`: each script's core at a tiny size, the simulated deformations of the
PRDFE experiment, and VoxelMorph's `similarity="mse"` objective."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from mdregnet import losses, models

from conftest import REPO


def _load(name):
    path = os.path.join(REPO, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation_mdregnet = _load("ablation_mdregnet")
ablation_prdfe = _load("ablation_prdfe_2d")
ablation_fcn = _load("ablation_fcn_ds")
common = _load("ablation_common")


def _smooth_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.uniform(size=shape), 1.5)
    image -= image.min()
    return (image / image.max()).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Simulated deformations (PRDFE Table I)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 40), (12, 16, 14)])
def test_simulated_field_warps_like_scipy_map_coordinates(shape):
    """The triple's fixed image is moving(p + u_g(p)): the convention of every model's `disp`.

    scipy's linear interpolation with mode 'grid-constant' (0 outside, per corner) is the
    reference; 1e-5 is float32 round-off on values in [0, 1]. A swapped component or a push-
    forward instead of a pull-back would differ by far more (the field is several pixels)."""
    rng = np.random.default_rng(1)
    image = _smooth_image(shape)
    disp = ablation_prdfe.random_deformation(rng, shape, level=1.0)
    assert disp.shape == shape + (len(shape),) and disp.dtype == np.float32
    assert np.abs(disp).max() > 1.0  # a real deformation, several pixels at level 1
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = [g + disp[..., c] for c, g in enumerate(grid)]
    expected = ndimage.map_coordinates(image.astype(np.float64), coords, order=1,
                                       mode="grid-constant", cval=0.0)
    warped = ablation_prdfe.warp_images(image[None], disp[None])[0]
    np.testing.assert_allclose(warped, expected, atol=1e-5)


def test_simulate_returns_consistent_triples_and_level_zero_is_identity():
    rng = np.random.default_rng(0)
    images = [_smooth_image((32, 32), seed=s) for s in range(3)]
    triples = ablation_prdfe.simulate(rng, images, 5)
    assert triples["moving"].shape == (5, 32, 32) and triples["disp"].shape == (5, 32, 32, 2)
    for m, f, d in zip(triples["moving"], triples["fixed"], triples["disp"]):
        grid = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
        expected = ndimage.map_coordinates(m.astype(np.float64),
                                           [grid[0] + d[..., 0], grid[1] + d[..., 1]], order=1,
                                           mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(f, expected, atol=1e-5)
    assert np.all((triples["level"] >= 0) & (triples["level"] <= 1))
    zero = ablation_prdfe.random_deformation(np.random.default_rng(0), (16, 16), level=0.0)
    np.testing.assert_array_equal(zero, 0.0)


def test_score_metrics_by_hand():
    fixed = np.zeros((1, 4, 4), np.float32)
    fixed[0, 1:3, 1:3] = 1.0
    warped = fixed.copy()
    warped[0, 0, 0] = 0.5
    truth = np.zeros((1, 4, 4, 2), np.float32)
    disp = truth.copy()
    disp[..., 0] = 2.0  # error (2, 0) everywhere
    per = ablation_prdfe.score(warped, disp, fixed, truth)
    assert per["image_mse"][0] == pytest.approx(0.25 / 16)
    assert per["deformation_mse"][0] == pytest.approx(2.0)  # mean over both components of 4, 0
    assert per["deformation_mse_foreground"][0] == pytest.approx(2.0)
    assert per["endpoint_error"][0] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------
# VoxelMorph similarity hyper-parameter
# ------------------------------------------------------------------------------------------------
_SMALL = {"enc_features": [4, 8, 8, 8], "dec_features": [8, 8, 8, 8, 8, 4, 4]}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_voxelmorph_mse_objective(bidirectional):
    """`similarity="mse"`: MSE(fixed, warped) [+ MSE(moving, warped_fixed)] + lam * Grad_l2(v),
    computed here with numpy from the model's outputs."""
    shape = (16, 16)
    lam = 0.3
    model = models.build("voxelmorph", shape, similarity="mse", lam=lam,
                         bidirectional=bidirectional, **_SMALL)
    rng = np.random.default_rng(0)
    moving = _smooth_image(shape, 1)[None, ..., None]
    fixed = _smooth_image(shape, 2)[None, ..., None]
    outputs = model([moving, fixed])
    # Non-zero velocity so that the gradient term is tested too.
    outputs = dict(outputs, velocity=tf.constant(rng.normal(size=outputs["velocity"].shape),
                                                 tf.float32))
    total, terms = models.objective(model)(moving, fixed, outputs)
    warped = np.asarray(outputs["warped"], np.float64)
    sim = np.mean((fixed - warped) ** 2)
    if bidirectional:
        sim += np.mean((moving - np.asarray(outputs["warped_fixed"], np.float64)) ** 2)
    v = np.asarray(outputs["velocity"], np.float64)
    grad = np.mean([np.mean(np.diff(v, axis=a) ** 2) for a in (1, 2)])
    assert float(terms["sim"]) == pytest.approx(sim, rel=1e-5)
    assert float(terms["grad"]) == pytest.approx(float(losses.Grad("l2")(None,
                                                                          outputs["velocity"])))
    assert float(terms["grad"]) == pytest.approx(grad, rel=1e-4)
    assert float(total) == pytest.approx(sim + lam * float(terms["grad"]), rel=1e-5)


def test_voxelmorph_similarity_default_is_ncc_and_bad_values_fail():
    assert models.defaults("voxelmorph")["similarity"] == "ncc"
    model = models.build("voxelmorph", (16, 16), **_SMALL)
    moving = _smooth_image((16, 16), 1)[None, ..., None]
    fixed = _smooth_image((16, 16), 2)[None, ..., None]
    outputs = model([moving, fixed])
    _, terms = models.objective(model)(moving, fixed, outputs)
    ncc = losses.NCC(window=9)
    expected = ncc(fixed, outputs["warped"]) + ncc(moving, outputs["warped_fixed"])
    assert float(terms["sim"]) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="similarity"):
        models.build("voxelmorph", (16, 16), similarity="ssd", **_SMALL)
    with pytest.raises(ValueError, match="similarity"):
        models.objective("voxelmorph", similarity="ssd")


# ------------------------------------------------------------------------------------------------
# MDReg-Net ablation
# ------------------------------------------------------------------------------------------------
def test_downsampling_blocks():
    images = np.arange(2 * 4 * 4 * 2, dtype=np.float32).reshape(2, 4, 4, 2)
    out = ablation_mdregnet.downsample_images(images, 2)
    assert out.shape == (2, 2, 2, 1)
    assert out[0, 0, 0, 0] == pytest.approx(images[0, :2, :2, :2].mean())
    labels = np.zeros((1, 2, 2, 2), np.int32)
    labels[0, 0, 0, :] = 5
    labels[0, 1, 1, :] = 5
    labels[0, 0, 1, 0] = 7  # 4 fives, 1 seven, 3 zeros
    assert ablation_mdregnet.downsample_labels(labels, 2)[0, 0, 0, 0] == 5
    labels[0, 1, 0, :] = 7  # 4 fives, 3 sevens, 1 zero
    assert ablation_mdregnet.downsample_labels(labels, 2)[0, 0, 0, 0] == 5
    labels[0, 0, 1, 1] = 7  # 4 fives, 4 sevens: tie -> the smaller label
    assert ablation_mdregnet.downsample_labels(labels, 2)[0, 0, 0, 0] == 5


def test_missing_data_says_make_prepare_ixi(tmp_path):
    with pytest.raises(FileNotFoundError, match="make prepare-ixi"):
        ablation_mdregnet.load_ixi(str(tmp_path / "absent"), None, False, 2, (16, 16, 16))
    with pytest.raises(FileNotFoundError, match="make prepare-ixi"):
        ablation_fcn.load_boxes(str(tmp_path / "absent"), None, None, (8, 8, 8), 48)


def test_script_main_turns_data_errors_into_one_line_and_refuses_arguments():
    from absl import app

    def run_from_flags(flag_values, argv):
        raise FileNotFoundError(f"{flag_values}: no prepared IXI data")

    main = common.absl_main("ablation_x", run_from_flags, "DIR")
    with pytest.raises(SystemExit, match=r"^ablation_x: error: DIR: no prepared IXI data$"):
        main(["ablation_x.py"])
    with pytest.raises(app.UsageError, match="unexpected arguments"):
        main(["ablation_x.py", "extra"])
    assert ablation_mdregnet.main.__qualname__ == "absl_main.<locals>.main"


def _cohort(n, shape, seed=0):
    """Smooth random volumes and 3-label maps (labels from intensity bands)."""
    images = np.stack([_smooth_image(shape, seed + i) for i in range(n)])
    labels = np.digitize(images, [0.35, 0.5, 0.65]).astype(np.int32)
    return images, labels


@pytest.mark.slow
def test_mdregnet_ablation_core(tmp_path):
    """One variant trained 1 step at 16^3 and scored both ways; the tables from its result.

    The network is cut down (one level, one squaring step, few features): tracing the train
    step of the full three-level network takes most of a minute on 2 CPU cores."""
    shape = (16, 16, 16)
    train_images, _ = _cohort(3, shape)
    val_images, val_labels = _cohort(3, shape, seed=10)
    val = {"ids": ["a", "b", "c"], "images": val_images, "labels": val_labels}
    small = {"enc_features": [4, 8, 8, 8], "dec_features": 8, "head_features": [8, 4],
             "levels": 1, "level_weights": [1.0], "int_steps": 1}
    plan = ablation_mdregnet.variants([0.1, 0.35], [0.5, 1.0], 0.35, small)
    assert [v["name"] for v in plan] == ["smoothing_lam0.1", "smoothing_lam0.35",
                                         "no_smoothing_lam0.5", "no_smoothing_lam1"]
    assert plan[2]["hparams"] == dict(small, lam=0.5, smoothing="none")
    kwargs = dict(steps=1, lams=[0.35], no_smoothing_lams=[], table3_lam=0.35, val_pairs=1,
                  workdir=str(tmp_path / "work"), extra_hparams=small, log=lambda *_: None)
    results = ablation_mdregnet.run(train_images, val, shape, **kwargs)
    assert [r["name"] for r in results] == ["smoothing_lam0.35"]
    (r,) = results
    assert r["n_pairs"] == 1 and r["hparams"]["smoothing"] == "deformation"
    for direction in ("forward", "inverse"):
        assert 0.0 <= r[direction]["dice_mean"]["mean"] <= 1.0
        assert r[direction]["folding_count_in_mask"]["n"] == 1
    # a rerun with the same settings reuses the finished variant instead of training again
    messages = []
    again = ablation_mdregnet.run(train_images, val, shape, **dict(kwargs, log=messages.append))
    assert any("reusing" in m for m in messages)
    assert again == json.loads(json.dumps(common.infer.jsonable(results)))
    # Table 3 also lists a model without the layer (here the same numbers, relabelled).
    results.append(dict(r, name="no_smoothing_lam0.5", smoothing=False, lam=0.5))
    settings = {"n_train": 3, "n_val": 3, "n_pairs": 1, "template_id": "b", "template_seed": 0,
                "size": list(shape), "voxel_mm_prepared": 2.0, "voxel_mm": 4.0,
                "downsample": 2, "fit_note": "", "steps": 1, "batch_size": 1, "lr": 1e-3,
                "seed": 0, "table3_lam": 0.35, "no_smoothing_lams": [0.5], "machine": "test",
                "wall_seconds": 1.0, "finished": "now", "command": "python x"}
    text = ablation_mdregnet.markdown(results, settings)
    assert "λ sweep" in text and "Table 3" in text and "CPU budget" in text
    assert "| 0.35 |" in text and "| without smoothing | 0.5 | inverse" in text
    md, js = common.write_report(str(tmp_path), "mdregnet", text,
                                 {"settings": settings, "results": results})
    assert os.path.basename(md) == "ablation_mdregnet.md"
    with open(js) as f:
        saved = json.load(f)
    assert saved["results"][0]["forward"]["dice_mean"]["n"] == 1
    assert saved["results"][1]["inverse"]["folding_count"]["n"] == 1


@pytest.mark.slow
def test_prdfe_ablation_core(tmp_path):
    """VoxelMorph-MSE trained 1 step on 32x32 triples; every method's hyper-parameters build."""
    for method in ablation_prdfe.METHODS:
        hp = ablation_prdfe.method_hparams(method, 0.01, [4, 8, 8, 8], [8, 8, 8, 8, 8, 4, 4])
        models.build(method, (32, 32), **hp)
    rng = np.random.default_rng(0)
    images = [_smooth_image((32, 32), s) for s in range(3)]
    test = ablation_prdfe.simulate(rng, images[:1], 3)
    results = ablation_prdfe.run(images[1:], test, ["voxelmorph"],
                                 ablation_prdfe.PAPER_LAMS, [4, 8, 8, 8],
                                 [8, 8, 8, 8, 8, 4, 4], steps=1, batch_size=2, lr=1e-4, seed=0,
                                 log=lambda *_: None)
    assert list(results) == ["identity", "voxelmorph"]
    assert results["voxelmorph"]["hparams"]["similarity"] == "mse"
    assert results["voxelmorph"]["hparams"]["int_steps"] == 0
    identity = results["identity"]["summary"]
    assert identity["deformation_mse"]["mean"] == pytest.approx(
        np.mean(test["disp"].astype(np.float64) ** 2), rel=1e-6)
    for name in ("identity", "voxelmorph"):
        summary = results[name]["summary"]
        for key in ablation_prdfe.METRIC_KEYS:
            assert summary[key]["n"] == 3
        assert set(summary["by_category"]) == {"small", "median", "large"}
    settings = {"size": 32, "train_images": ["b", "c"], "test_images": ["a"], "n_test": 3,
                "test_per_image": 3, "seed": 0, "lams": ablation_prdfe.PAPER_LAMS, "steps": 1,
                "batch_size": 2, "lr": 1e-4, "enc_features": [4, 8, 8, 8],
                "dec_features": [8, 8, 8, 8, 8, 4, 4], "machine": "test", "wall_seconds": 1.0,
                "finished": "now", "command": "python x"}
    text = ablation_prdfe.markdown(results, settings)
    assert "Image intensity MSE" in text and "Deformation field MSE" in text
    assert "| Image intensity MSE | 0.0" in text and "CPU budget" in text
    md, js = common.write_report(str(tmp_path), "prdfe_2d", text, {"results": results})
    with open(js) as f:
        assert json.load(f)["results"]["voxelmorph"]["summary"]["image_mse"]["n"] == 3


def test_prdfe_loads_the_shared_slices():
    from conftest import shared_path

    slices = ablation_prdfe.load_slices(shared_path("slices2d"), 32)
    assert {"r85slice", "oasis002"} <= set(slices)
    for image in slices.values():
        assert image.shape == (32, 32) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.5


@pytest.mark.slow
def test_fcn_ablation_core(tmp_path):
    """The coarse-grained model trained 1 step on 8^3 boxes; every variant builds."""
    shape = (8, 8, 8)
    train_images, train_labels = _cohort(4, shape)
    val_images, val_labels = _cohort(3, shape, seed=10)
    boxes = {"train": train_images, "train_labels": train_labels, "val": val_images,
             "val_labels": val_labels, "centre": [4.0, 4.0, 4.0]}
    small = {"conv_features": [4, 8, 8, 4], "deconv_features": [8, 4]}
    pair = [train_images[:1, ..., None], train_images[1:2, ..., None]]
    outputs = {name: set(models.build("fcn_ds", shape, **small, **hp)(pair))
               for name, hp in ablation_fcn.VARIANTS.items()}
    assert "disp_level2" in outputs["multi_resolution"]  # three loss layers, Reg1 at 1/4
    assert "disp_coarse" in outputs["coarse_grained"]  # one 1/4 field, interpolated
    assert "disp_coarse" not in outputs["no_pooling"] and "disp_level1" not in outputs[
        "no_pooling"]
    results = ablation_fcn.run(boxes, ["coarse_grained"], steps=1, batch_size=2, lr=1e-3,
                               seed=0, eval_pairs=3, label=2, log=lambda *_: None,
                               extra_hparams=small)
    assert list(results) == ["coarse_grained"]
    assert results["coarse_grained"]["hparams"]["levels"] == 1
    results["no_pooling"] = dict(results["coarse_grained"],
                                 hparams=dict(results["coarse_grained"]["hparams"],
                                              pooling=False))
    for r in results.values():
        assert r["train_pairs"]["ncc"]["n"] == 3 and r["test_pairs"]["dice"]["n"] == 3
        assert -1.0 <= r["test_pairs"]["ncc"]["mean"] <= 1.0
    settings = {"box": list(shape), "voxel_mm": 2.0, "label": 2, "centre": [4.0, 4.0, 4.0],
                "n_train": 4, "n_val": 3, "steps": 1, "batch_size": 2, "lr": 1e-3, "seed": 0,
                "machine": "test", "wall_seconds": 1.0, "finished": "now",
                "command": "python x"}
    text = ablation_fcn.markdown(results, settings)
    assert "without pooling layers" in text and "coarse-grained" in text and "CPU budget" in text
    md, js = common.write_report(str(tmp_path), "fcn_ds", text, {"results": results})
    with open(js) as f:
        assert json.load(f)["results"]["coarse_grained"]["test_pairs"]["ncc"]["n"] == 3


def test_box_crop_and_global_ncc():
    volume = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    box = ablation_fcn.crop_box(volume, (5.0, 5.0, 5.0), (4, 4, 4))
    np.testing.assert_array_equal(box, volume[3:7, 3:7, 3:7])
    edge = ablation_fcn.crop_box(volume, (0.0, 5.0, 5.0), (4, 4, 4))  # zero-padded outside
    np.testing.assert_array_equal(edge[:2], 0.0)
    np.testing.assert_array_equal(edge[2:], volume[0:2, 3:7, 3:7])
    a = np.random.default_rng(0).normal(size=100)
    assert ablation_fcn.global_ncc(a, 3 * a + 1) == pytest.approx(1.0)
    assert ablation_fcn.global_ncc(a, -a) == pytest.approx(-1.0)
    labels = np.zeros((2, 6, 6, 6), np.int32)
    labels[0, 1, 2, 3] = labels[1, 3, 2, 1] = 48
    np.testing.assert_allclose(ablation_fcn.label_centre(labels, 48), [2.0, 2.0, 2.0])
