"""`mdregnet.cohort`: many subjects to a template, an atlas to many subjects, resume, failures."""

import csv
import json
import os
import shutil
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
from absl import app, flags

from mdregnet import cohort, infer, io, metrics, models
from test_infer import (AFFINE, REPO, SHAPE, leftovers, perturbed_model, pull_back, save_nifti,
                        synthetic_subject)

IDS = ("sub1", "sub2", "sub3")
# Tolerance of displacements compared between two runs of the same model on the same inputs
# (other batch sizes or replica splits): float32 round-off of differently blocked convolutions.
DISP_ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The saved perturbed voxelmorph of tests/test_infer.py (a clearly non-zero field)."""
    directory = str(tmp_path_factory.mktemp("model") / "voxelmorph")
    models.save(perturbed_model(), directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_dir):
    """A template with labels and three subjects on its grid (sub3 without labels; sub2's
    intensities x 255, so it is normalised).

    The perturbed model's field is close to a translation `d` (its flow bias); the subjects are
    the template shifted by about `-d`, so warping the template (atlas) by the model's field
    moves it onto them: atlas propagation must raise Dice, whatever d is.
    """
    root = tmp_path_factory.mktemp("cohort")
    template, template_seg = synthetic_subject(seed=1)
    model = models.load(model_dir)
    t = template[None, ..., None]
    d = np.asarray(model([t, t], training=False)["disp"])[0].mean(axis=(0, 1, 2))
    assert np.abs(d).max() > 0.5, d  # a translation of about a voxel, or Dice cannot improve
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    out = {"root": root, "images": str(images), "labels": str(labels), "subjects": {},
           "template": save_nifti(root / "template.nii.gz", template),
           "template_labels": save_nifti(root / "template_seg.nii.gz", template_seg)}
    for k, subject_id in enumerate(IDS):
        image, seg = synthetic_subject(shift=tuple(-d + 0.3 * (k - 1)), seed=10 + k)
        scale = 255.0 if subject_id == "sub2" else 1.0
        entry = {"image": save_nifti(images / f"{subject_id}.nii.gz", image * scale),
                 "array": image, "seg": seg, "labels": None}
        if subject_id != "sub3":
            entry["labels"] = save_nifti(labels / f"{subject_id}_seg.nii.gz", seg)
        out["subjects"][subject_id] = entry
    return out


def load(path, dtype=np.float64):
    return np.asarray(nib.load(str(path)).dataobj).astype(dtype)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def mtimes(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def quiet(line):
    pass


# ------------------------------------------------------------------------------------------------
# Mode A: every subject to the template
# ------------------------------------------------------------------------------------------------
def test_to_template_writes_subject_folders_and_the_csv_with_dice(files, model_dir, tmp_path):
    out = tmp_path / "reg"
    subjects = cohort.find_cohort(files["images"], files["labels"])
    assert [s.id for s in subjects] == list(IDS)
    assert subjects[2].labels is None and subjects[0].labels.endswith("sub1_seg.nii.gz")
    report = cohort.register_to_template(model_dir, files["template"], subjects, str(out),
                                         fixed_labels=files["template_labels"], batch_size=2,
                                         log=quiet)
    assert (report.n_ok, report.n_failed, report.n_skipped, report.processed) == (3, 0, 0, 3)
    assert leftovers(out) == []
    template_seg = load(files["template_labels"], np.int32)
    rows = read_csv(out / cohort.CSV_NAME)
    assert [r["id"] for r in rows] == list(IDS)
    assert list(rows[0]) == list(cohort.CSV_COLUMNS)

    for row in rows:
        subject = files["subjects"][row["id"]]
        folder = out / row["id"]
        expected = set(cohort.COHORT_FILES) - ({"warped_labels.nii.gz"} if subject["labels"] is None
                                               else set())
        assert set(os.listdir(folder)) == expected
        for name in expected - {"summary.json"}:
            np.testing.assert_allclose(nib.load(str(folder / name)).affine, AFFINE, atol=1e-5)
        disp = load(folder / "disp.nii.gz")
        assert disp.shape == (*SHAPE, 3) and 0.05 < np.abs(disp).mean() < 5.0
        # The subject is MOVING: the warped file is its image (sub2 normalised, the others
        # already in [0, 1]) pulled back by disp.
        moving = load(subject["image"])
        moving = io.normalize_intensity(moving) if row["id"] == "sub2" else moving
        np.testing.assert_allclose(load(folder / "warped.nii.gz"), pull_back(moving, disp),
                                   atol=2e-3)  # float32 round-off of the trilinear warp
        # det(I + grad disp) in float32 (TF) against the float64 reference.
        jac = load(folder / "jacobian_det.nii.gz")
        np.testing.assert_allclose(jac, metrics.jacobian_determinant(disp), atol=1e-4)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["id"] == row["id"] and summary["mode"] == "to_template"
        assert summary["moving"] == subject["image"] and summary["fixed"] == files["template"]
        assert summary["normalised"]["moving"] is (row["id"] == "sub2")
        assert summary["folding"] == metrics.folding(disp, mask=template_seg > 0)
        assert summary["sdlogj"] == pytest.approx(metrics.sd_log_jacobian(disp), rel=1e-4)
        assert row["status"] == "ok" and float(row["time_s"]) > 0
        assert float(row["sdlogj"]) == pytest.approx(summary["sdlogj"], rel=1e-5)
        assert int(row["folding_count"]) == summary["folding"]["count"]
        if subject["labels"] is None:
            assert summary["dice"] is None and row["dice_mean"] == ""
        else:
            warped_seg = load(folder / "warped_labels.nii.gz", np.int32)
            assert np.mean(warped_seg == pull_back(subject["seg"], disp, order=0)) > 0.999
            _, mean = metrics.dice(template_seg, warped_seg)
            assert summary["dice"]["mean"] == pytest.approx(mean)
            assert float(row["dice_mean"]) == pytest.approx(mean, rel=1e-5)

    # The same pair through the one-pair path (batch 1, no tf.data): the same field.
    single = infer.register(model_dir, files["subjects"]["sub2"]["image"], files["template"],
                            str(tmp_path / "single"), figure=False)
    np.testing.assert_allclose(load(out / "sub2" / "disp.nii.gz"),
                               load(tmp_path / "single" / "disp.nii.gz"), atol=DISP_ATOL)
    assert single["normalised"]["moving"] is True


def test_batch_size_two_gives_the_displacements_of_batch_size_one(files, model_dir, tmp_path):
    subjects = cohort.find_cohort(files["images"])  # 3 subjects: the last batch of 2 is padded
    disps = {}
    for batch_size in (1, 2):
        out = tmp_path / f"b{batch_size}"
        report = cohort.register_to_template(model_dir, files["template"], subjects, str(out),
                                             batch_size=batch_size, log=quiet)
        assert report.n_ok == 3
        disps[batch_size] = [load(out / i / "disp.nii.gz") for i in IDS]
    for one, two in zip(disps[1], disps[2]):
        np.testing.assert_allclose(two, one, atol=DISP_ATOL)
    # Not trivially equal: the subjects' fields differ from each other.
    assert np.abs(disps[1][0] - disps[1][1]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Mode B: the atlas to every subject
# ------------------------------------------------------------------------------------------------
def test_atlas_propagation_segments_every_subject(files, model_dir, tmp_path):
    out = tmp_path / "seg"
    subjects = cohort.find_cohort(files["images"], files["labels"])
    report = cohort.propagate_atlas(model_dir, files["template"], files["template_labels"],
                                    subjects, str(out), batch_size=2, log=quiet)
    assert report.n_ok == 3 and report.n_failed == 0
    atlas = load(files["template"])
    atlas_seg = load(files["template_labels"], np.int32)
    rows = {r["id"]: r for r in read_csv(out / cohort.CSV_NAME)}
    for subject_id in IDS:
        subject = files["subjects"][subject_id]
        folder = out / subject_id
        assert set(os.listdir(folder)) == set(cohort.COHORT_FILES)  # atlas labels always warped
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["moving"] == files["template"] and summary["fixed"] == subject["image"]
        assert summary["moving_labels"] == files["template_labels"]
        disp = load(folder / "disp.nii.gz")
        # The ATLAS is moving: its image and labels are pulled back onto the subject's grid.
        np.testing.assert_allclose(load(folder / "warped.nii.gz"), pull_back(atlas, disp),
                                   atol=2e-3)
        segmentation = load(folder / "warped_labels.nii.gz", np.int32)
        assert np.mean(segmentation == pull_back(atlas_seg, disp, order=0)) > 0.999
        if subject["labels"] is None:
            assert summary["dice"] is None and rows[subject_id]["dice_mean"] == ""
            continue
        # The propagated atlas labels segment the subject better than the unregistered atlas.
        _, after = metrics.dice(subject["seg"], segmentation)
        _, before = metrics.dice(subject["seg"], atlas_seg)
        assert summary["dice"]["mean"] == pytest.approx(after)
        assert summary["dice"]["before"] == pytest.approx(before)
        assert after > before + 0.05, (after, before)
        assert float(rows[subject_id]["dice_mean"]) == pytest.approx(after, rel=1e-5)
        # Folding inside the SUBJECT's brain mask (it is the fixed image).
        assert summary["folding"] == metrics.folding(disp, mask=subject["seg"] > 0)

    single = infer.register(model_dir, files["template"], files["subjects"]["sub1"]["image"],
                            str(tmp_path / "single"), figure=False)
    np.testing.assert_allclose(load(out / "sub1" / "disp.nii.gz"),
                               load(tmp_path / "single" / "disp.nii.gz"), atol=DISP_ATOL)
    assert single["fixed"] == files["subjects"]["sub1"]["image"]


# ------------------------------------------------------------------------------------------------
# Failures, resume, interruption
# ------------------------------------------------------------------------------------------------
def test_bad_subjects_fail_their_rows_and_the_command_exits_1(files, model_dir, tmp_path):
    """The command line on 2 logical CPU devices with --strategy mirrored: each batch of 2 is
    split over 2 replicas; a corrupt file and an image on another grid fail their rows only."""
    images = tmp_path / "images"
    shutil.copytree(files["images"], images)
    (images / "sub0_corrupt.nii.gz").write_bytes(b"not a NIfTI file at all" * 20)
    shifted = AFFINE.copy()
    shifted[0, 3] += 10.0
    save_nifti(images / "sub4_offgrid.nii.gz", files["subjects"]["sub1"]["array"], shifted)
    out = tmp_path / "cli out"
    code = ("import runpy, sys, tensorflow as tf; "
            "cpu = tf.config.list_physical_devices('CPU')[0]; "
            "tf.config.set_logical_device_configuration(cpu, "
            "[tf.config.LogicalDeviceConfiguration()] * 2); "
            "sys.argv = ['mdregnet.infer'] + sys.argv[1:]; "
            "runpy.run_module('mdregnet.infer', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", code, "--fixed", files["template"], "--moving_dir", str(images),
         "--labels_dir", files["labels"], "--fixed_labels", files["template_labels"],
         "--model", model_dir, "--out", str(out), "--batch_size", "2", "--strategy", "mirrored",
         "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 of 5 subjects failed" in result.stderr
    assert "cohort: 5/5 subjects (3 ok, 2 failed, 0 skipped)" in result.stdout, result.stdout
    rows = {r["id"]: r for r in read_csv(out / cohort.CSV_NAME)}
    assert list(rows) == ["sub0_corrupt", "sub1", "sub2", "sub3", "sub4_offgrid"]
    bad = rows["sub0_corrupt"]["status"]
    assert bad.startswith("failed: ") and "sub0_corrupt.nii.gz" in bad and "\n" not in bad
    off = rows["sub4_offgrid"]["status"]
    assert off.startswith("failed: ") and "sub4_offgrid.nii.gz" in off and "same grid" in off
    assert rows["sub0_corrupt"]["time_s"] == "" and rows["sub0_corrupt"]["dice_mean"] == ""
    assert not (out / "sub0_corrupt").exists() and not (out / "sub4_offgrid").exists()
    for subject_id in IDS:
        assert rows[subject_id]["status"] == "ok"
        summary = json.loads((out / subject_id / "summary.json").read_text())
        assert summary["replicas"] == 2 and summary["batch_size"] == 2
    # Split over two replicas, the fields are those of the one-pair path.
    infer.register(model_dir, files["subjects"]["sub3"]["image"], files["template"],
                   str(tmp_path / "single"), figure=False)
    np.testing.assert_allclose(load(out / "sub3" / "disp.nii.gz"),
                               load(tmp_path / "single" / "disp.nii.gz"), atol=DISP_ATOL)


def test_a_rerun_redoes_only_the_missing_subjects(files, model_dir, tmp_path):
    out = tmp_path / "reg"
    subjects = cohort.find_cohort(files["images"])
    registration = cohort.CohortRegistration(model_dir, files["template"])
    registration.warm_up()
    first = registration.run(subjects, str(out), log=quiet)
    assert first.n_ok == 3
    first_rows = {r["id"]: r for r in read_csv(out / cohort.CSV_NAME)}
    before = {i: mtimes(out / i) for i in IDS}
    shutil.rmtree(out / "sub2")

    lines = []
    second = registration.run(subjects, str(out), log=lines.append)
    assert (second.n_ok, second.n_skipped, second.processed) == (1, 2, 1)
    assert any("2 of 3 subjects already done" in line for line in lines), lines
    for subject_id in ("sub1", "sub3"):
        assert mtimes(out / subject_id) == before[subject_id]  # not rewritten
    assert set(os.listdir(out / "sub2")) == set(before["sub2"])
    rows = {r["id"]: r for r in read_csv(out / cohort.CSV_NAME)}
    assert [rows[i]["status"] for i in IDS] == ["skipped", "ok", "skipped"]
    for subject_id in ("sub1", "sub3"):  # read back from summary.json
        for key in ("time_s", "folding_count", "folding_percent", "sdlogj"):
            assert rows[subject_id][key] == first_rows[subject_id][key], key
    # warm_up traced the batch step once for every later batch of both runs.
    assert registration._step.experimental_get_tracing_count() == 1

    # Another model (the same weights saved elsewhere) makes the finished subjects stale.
    other_model = str(tmp_path / "other_model")
    shutil.copytree(model_dir, other_model)
    lines = []
    other = cohort.CohortRegistration(other_model, files["template"])
    report = other.run(subjects[:1], str(out), log=lines.append)
    assert (report.n_ok, report.n_skipped) == (1, 0)
    assert any("registered with other settings" in line for line in lines), lines
    assert mtimes(out / "sub1") != before["sub1"]
    assert json.loads((out / "sub1" / "summary.json").read_text())["cohort"]["model"] == \
        other_model


def test_an_interrupted_run_leaves_no_partial_folder_and_the_rerun_finishes(
        files, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "reg"
    subjects = cohort.find_cohort(files["images"])
    registration = cohort.CohortRegistration(model_dir, files["template"])
    save_volume = io.save_volume
    calls = {"n": 0}
    lock = threading.Lock()

    def interrupted(*args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 5:  # sub2's second file (warped, disp, jacobian_det per subject)
            raise KeyboardInterrupt
        return save_volume(*args, **kwargs)

    monkeypatch.setattr(io, "save_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registration.run(subjects, str(out), log=quiet)
    monkeypatch.setattr(io, "save_volume", save_volume)
    assert sorted(os.listdir(out)) == [cohort.CSV_NAME, "sub1"]  # nothing of sub2, no temp files
    assert set(os.listdir(out / "sub1")) == set(cohort.COHORT_FILES) - {"warped_labels.nii.gz"}
    assert [r["id"] for r in read_csv(out / cohort.CSV_NAME)] == ["sub1"]
    done = mtimes(out / "sub1")

    report = registration.run(subjects, str(out), log=quiet)
    assert (report.n_ok, report.n_skipped) == (2, 1)
    assert mtimes(out / "sub1") == done
    assert [r["status"] for r in read_csv(out / cohort.CSV_NAME)] == ["skipped", "ok", "ok"]
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------
def test_deformation_stats_equals_the_metrics_module():
    rng = np.random.default_rng(0)
    disp = rng.normal(0.0, 0.6, (12, 10, 8, 3))  # rough enough to fold
    mask = np.zeros((12, 10, 8), bool)
    mask[2:9, 3:8, 1:6] = True
    stats, jac = infer.deformation_stats(disp, mask=mask)
    fold = metrics.folding(disp, mask=mask)
    assert fold["count"] > 0 and stats["folding"] == fold
    assert stats["sdlogj"] == metrics.sd_log_jacobian(disp)
    assert stats["sdlogj_in_mask"] == metrics.sd_log_jacobian(disp, mask=mask)
    assert jac.dtype == np.float32
    np.testing.assert_allclose(jac, metrics.jacobian_determinant(disp), rtol=1e-6)
    # From TensorFlow's float32 determinant (the cohort's batch step): float32 round-off.
    jac_tf = np.asarray(metrics.jacobian_determinant_tf(disp[None].astype(np.float32)))[0]
    stats_tf, _ = infer.deformation_stats(disp, mask=mask, jac=jac_tf)
    assert abs(stats_tf["folding"]["count"] - fold["count"]) <= 2
    assert stats_tf["sdlogj"] == pytest.approx(stats["sdlogj"], rel=1e-4)
    with pytest.raises(ValueError, match="mask"):
        infer.deformation_stats(disp, mask=mask[:-1])


@pytest.mark.parametrize("argv, match", [
    (["--moving_dir", "d"], "needs --fixed"),
    (["--subjects_dir", "d", "--atlas", "a"], "--atlas and --atlas_labels"),
    (["--atlas", "a", "--atlas_labels", "l"], "need --subjects_dir"),
    (["--moving_dir", "d", "--subjects_dir", "e", "--fixed", "f"], "not both"),
    (["--subjects_dir", "d", "--atlas", "a", "--atlas_labels", "l", "--fixed", "f"],
     "--fixed/--fixed_labels go with --moving_dir"),
    (["--moving_dir", "d", "--fixed", "f", "--moving", "m"], "--moving is for one pair"),
    (["--moving_dir", "d", "--fixed", "f", "--preprocess"], "preprocess the cohort first"),
    (["--moving", "m", "--fixed", "f", "--batch_size", "2"], "--batch_size is for cohort mode"),
    (["--moving", "m", "--fixed", "f", "--labels_dir", "l"], "--labels_dir is for cohort mode"),
])
def test_contradictory_flags_are_usage_errors(argv, match, tmp_path):
    fv = flags.FlagValues()
    infer.define_flags(fv)
    fv(["infer", "--out", str(tmp_path / "o")] + argv)
    with pytest.raises(app.UsageError, match=match):
        infer.run_from_flags(fv)
    assert not (tmp_path / "o").exists()


def test_find_cohort_keeps_subjects_without_labels_and_reads_an_id_list(files, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("sub3\n# a comment\nsub1.nii.gz\n")
    found = cohort.find_cohort(files["images"], files["labels"], subjects=str(ids))
    assert [(s.id, s.labels is not None) for s in found] == [("sub3", False), ("sub1", True)]
    with pytest.raises(io.InvalidInputError, match="label folder is the image folder"):
        cohort.find_cohort(files["images"], files["images"])


def test_refinement_per_subject_is_the_one_pair_refinement(files, model_dir, tmp_path):
    subject = files["subjects"]["sub1"]
    subjects = cohort.find_cohort(files["images"], subjects=["sub1"])
    out = tmp_path / "refined"
    report = cohort.propagate_atlas(model_dir, files["template"], files["template_labels"],
                                    subjects, str(out), refine_steps=5, log=quiet)
    assert report.n_ok == 1
    summary = json.loads((out / "sub1" / "summary.json").read_text())
    assert summary["refine"]["steps"] == 5
    assert summary["refine"]["loss_after"] < summary["refine"]["loss_before"]
    assert summary["time_s"] > summary["refine"]["seconds"]
    disp = load(out / "sub1" / "disp.nii.gz")
    np.testing.assert_allclose(load(out / "sub1" / "warped.nii.gz"),
                               pull_back(load(files["template"]), disp), atol=2e-3)
    # The same refinement as the one-pair path's, from the same start (it is deterministic).
    single = infer.register(model_dir, files["template"], subject["image"],
                            str(tmp_path / "single"), figure=False, refine_steps=5)
    np.testing.assert_allclose(disp, load(tmp_path / "single" / "disp.nii.gz"), atol=DISP_ATOL)
    assert single["refine"]["loss_after"] == pytest.approx(summary["refine"]["loss_after"],
                                                           rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Several hosts: two workers on 127.0.0.1
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_split_the_cohort_and_the_chief_writes_every_row(files, model_dir, tmp_path):
    """`--strategy multi_worker`, two processes with TF_CONFIG: each registers its share of the
    subjects (worker 0: sub1, sub3; worker 1: sub2), the chief's cohort.csv has every row, the
    fields are those of one process, and a rerun of both skips everything."""
    import socket

    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    out = tmp_path / "reg"
    command = [sys.executable, "-m", "mdregnet.infer", "--strategy", "multi_worker",
               "--fixed", files["template"], "--fixed_labels", files["template_labels"],
               "--moving_dir", files["images"], "--labels_dir", files["labels"],
               "--model", model_dir, "--out", str(out), "--device", "cpu"]

    def run_cluster():
        procs = []
        for index in range(2):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                       TF_CONFIG=json.dumps({"cluster": cluster,
                                             "task": {"type": "worker", "index": index}}),
                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                                          stdin=subprocess.DEVNULL))
        logs = [p.communicate(timeout=400)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
        return logs

    logs = run_cluster()
    assert "worker 0 of 2 takes 2 of the 3 subjects" in logs[0]
    assert "worker 1 of 2 takes 1 of the 3 subjects" in logs[1]
    rows = read_csv(out / cohort.CSV_NAME)
    assert [(r["id"], r["status"]) for r in rows] == [(i, "ok") for i in IDS]
    assert rows[0]["dice_mean"] != "" and rows[2]["dice_mean"] == ""
    assert sorted(os.listdir(out)) == [cohort.CSV_NAME, *IDS]  # the workers' rows removed
    assert leftovers(out) == []

    single = tmp_path / "single"
    report = cohort.register_to_template(model_dir, files["template"],
                                         cohort.find_cohort(files["images"], files["labels"]),
                                         str(single), fixed_labels=files["template_labels"],
                                         log=quiet)
    assert report.n_ok == 3
    for subject_id in IDS:
        np.testing.assert_allclose(load(out / subject_id / "disp.nii.gz"),
                                   load(single / subject_id / "disp.nii.gz"), atol=DISP_ATOL)

    logs = run_cluster()
    assert all("3 of 3 subjects already done" in log for log in logs)
    assert [r["status"] for r in read_csv(out / cohort.CSV_NAME)] == ["skipped"] * 3
