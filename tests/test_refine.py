"""`mdregnet.refine`: test-time optimisation of one pair's velocity field with the model's loss."""

import json

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from mdregnet import infer, layers, metrics, models, refine

from test_infer import perturbed_model, save_nifti, synthetic_subject

SHAPE = (32, 32, 32)


def _as_batch(volume):
    return np.asarray(volume, np.float32)[None, ..., None]


@pytest.fixture(scope="module")
def synthetic_pair():
    """A fixed and a shifted moving synthetic subject, `(1, 32, 32, 32, 1)` in [0, 1]."""
    fixed, _ = synthetic_subject(seed=1)
    moving, _ = synthetic_subject(shift=(1.5, -1.0, 0.5), seed=2)
    return _as_batch(moving), _as_batch(fixed)


def _model(name, hparams):
    model = perturbed_model(name, SHAPE)
    if not hparams:
        return model
    variant = models.build(name, SHAPE, **hparams)  # same weights, another field mapping
    variant.set_weights(model.get_weights())
    return variant


@pytest.mark.parametrize("name, hparams", [("mdregnet", {}),
                                           ("mdregnet", {"smoothing": "velocity"}),
                                           ("mdregnet", {"int_downsize": 2}),
                                           ("mdregnet", {"int_downsize": 2,
                                                         "smoothing": "velocity"}),
                                           ("voxelmorph", {})])
def test_zero_steps_reproduce_the_model_outputs(synthetic_pair, name, hparams):
    moving, fixed = synthetic_pair
    model = _model(name, hparams)
    out = model([moving, fixed], training=False)
    disp = np.asarray(out["disp"])
    assert np.abs(disp).max() > 0.5  # a clearly nonzero field, or the test proves nothing

    refined, info = refine.refine(model, moving, fixed, 0)
    # Same ops on the same velocity: equal up to float32 round-off of fields of a few voxels.
    for key in ("velocity", "disp", "inverse_disp", "warped", "warped_fixed"):
        np.testing.assert_allclose(np.asarray(refined[key]), np.asarray(out[key]), rtol=0,
                                   atol=1e-5, err_msg=key)
    assert info["steps"] == 0 and info["history"] == [info["loss_before"]]
    assert info["loss_after"] == info["loss_before"] and info["start_mismatch_vox"] < 1e-5

    # The loss is the model's own final-resolution term. Relative 1e-3: local NCC amplifies the
    # ~1e-6 round-off between the graph and eager warps in near-flat windows (seen: 1.6e-4).
    total, terms = models.objective(model)(moving, fixed, out)
    if name == "voxelmorph":  # one level, velocity regularised: the whole objective
        assert info["loss_before"] == pytest.approx(float(total), rel=1e-3)
    else:  # MDReg-Net: level L similarity (full resolution, final transform)
        assert info["terms_before"]["sim"] == pytest.approx(float(terms["sim_level3"]), rel=1e-3)
    if (hparams.get("smoothing", "deformation") == "deformation" and name == "mdregnet"
            and hparams.get("int_downsize", 1) == 1):
        # Without the smoothing layer the mapping would be off by 100x the tolerance or more
        # (this field is mostly a translation, which the smoothing keeps; seen: 2.8e-3).
        plain = np.asarray(layers.integrate_svf(out["velocity"], 7))
        assert np.abs(plain - disp).max() > 1e-3


def test_refinement_improves_a_real_pair(oasis_pair_3d):
    moving, fixed, moving_seg, fixed_seg = oasis_pair_3d
    m, f = _as_batch(moving / moving.max()), _as_batch(fixed / fixed.max())
    model = models.build("mdregnet", moving.shape)  # untrained: about the identity
    out = model([m, f], training=False)
    steps = 15
    seen = {}

    def callback(k, outputs):
        seen[k] = np.asarray(outputs["disp"])[0]

    refined, info = refine.refine(model, m, f, steps, outputs=out, callback=callback)
    disp = np.asarray(refined["disp"])[0]

    def dice(d):
        return metrics.dice(fixed_seg, infer.warp_labels(moving_seg, d))[1]

    start = dice(np.asarray(out["disp"])[0])
    after = dice(disp)
    # Measured: Dice 0.469 -> 0.612, loss -0.894 -> -1.292 (lr 0.1, 15 steps).
    assert after > start + 0.05, (start, after)
    assert info["loss_after"] < info["loss_before"] - 0.1
    assert metrics.folding(disp)["count"] == 0
    assert metrics.folding(np.asarray(refined["inverse_disp"])[0])["count"] == 0
    assert len(info["history"]) == steps + 1 and len(info["history_terms"]["sim"]) == steps + 1
    assert info["history"][0] == info["loss_before"] and info["history"][-1] == info["loss_after"]
    assert info["lr"] == refine.DEFAULT_LR and info["seconds"] > 0
    assert sorted(seen) == list(range(steps + 1))
    np.testing.assert_allclose(seen[0], np.asarray(out["disp"])[0], atol=1e-5)
    np.testing.assert_array_equal(seen[steps], disp)
    # The inverse is exp(-v), not the first-order -disp: phi^-1 o phi is closer to the identity
    # (inside, away from the faces; seen 0.049 vs 0.107 voxels; the smoothing of both fields
    # keeps it from being exact).
    interior = (slice(4, -4),) * 3

    def round_trip(inverse):
        return np.abs(np.asarray(layers.compose(refined["disp"], inverse))[0][interior]).mean()

    assert round_trip(refined["inverse_disp"]) < 0.75 * round_trip(-refined["disp"])


@pytest.mark.parametrize("name", ["prdfe", "fcn_ds"])
def test_model_without_velocity_raises(name):
    model = models.build(name, SHAPE)
    image = np.zeros((1, *SHAPE, 1), np.float32)
    with pytest.raises(ValueError, match=name):
        refine.refine(model, image, image, 5)


def test_infer_refine_flag_writes_the_refine_block(tmp_path):
    fixed, fixed_seg = synthetic_subject(seed=1)
    moving, moving_seg = synthetic_subject(shift=(1.5, -1.0, 0.5), seed=2)
    paths = {"moving": save_nifti(tmp_path / "m.nii.gz", moving),
             "fixed": save_nifti(tmp_path / "f.nii.gz", fixed)}
    model_dir = str(tmp_path / "model")
    models.save(perturbed_model("voxelmorph", SHAPE), model_dir)
    out = tmp_path / "reg"
    fv = flags.FlagValues()
    infer.define_flags(fv)
    fv(["infer", "--moving", paths["moving"], "--fixed", paths["fixed"], "--model", model_dir,
        "--out", str(out), "--refine_steps", "3", "--refine_lr", "0.2", "--nofigure"])
    summary = infer.run_from_flags(fv)

    written = json.loads((out / "summary.json").read_text())
    assert written["refine"] == summary["refine"]
    block = written["refine"]
    assert set(block) == {"steps", "seconds", "loss_before", "loss_after", "lr"}
    assert block["steps"] == 3 and block["lr"] == pytest.approx(0.2) and block["seconds"] > 0
    assert block["loss_after"] < block["loss_before"]
    # The written field is the refined one, not the network's.
    disp = np.asarray(nib.load(str(out / "disp.nii.gz")).dataobj)
    model = models.load(model_dir)
    plain, _ = infer.predict(model, moving, fixed)
    again, _ = infer.predict(model, moving, fixed, refine_steps=3, refine_lr=0.2)
    assert np.abs(disp - plain["disp"]).max() > 1e-2
    np.testing.assert_allclose(disp, again["disp"], atol=1e-4)
    assert again["refine"]["loss_after"] == pytest.approx(block["loss_after"], abs=1e-5)


def test_evaluate_refines_every_pair_and_counts_its_time(monkeypatch):
    from mdregnet import evaluate

    subjects = [synthetic_subject(shift=shift, seed=seed)
                for seed, shift in enumerate([(0, 0, 0), (1.5, -1, 0.5), (-1, 1, 1)])]
    images = np.stack([s[0] for s in subjects])
    labels = np.stack([s[1] for s in subjects])
    calls = []
    real = refine.refine

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result[1])
        return result

    monkeypatch.setattr(refine, "refine", spy)
    rows, summary = evaluate.evaluate(perturbed_model("voxelmorph", SHAPE), images, labels,
                                      ["s0", "s1", "s2"], template_id="s0", refine_steps=3)
    # One warm-up step, then 3 steps per moving subject, each inside that pair's time.
    assert [info["steps"] for info in calls] == [1, 3, 3]
    for row, info in zip(rows, calls[1:]):
        assert row["time_s"] >= info["seconds"] > 0
    assert summary["refine"] == {"steps": 3, "lr": refine.DEFAULT_LR}
    assert "test-time refinement: 3 Adam steps" in evaluate.summary_markdown(summary)

    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["evaluate", "--refine_steps", "7", "--refine_lr", "0.05"])
    assert fv.refine_steps == 7 and fv.refine_lr == 0.05
