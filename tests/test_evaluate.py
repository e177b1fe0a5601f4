"""`mdregnet.evaluate`: the paper's all-to-one-template protocol and its report files."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from mdregnet import evaluate, models

from test_infer import AFFINE, REPO, perturbed_model, synthetic_subject

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def cohort():
    """Four synthetic subjects; 's3' is an exact copy of 's1' (self-registration check)."""
    subjects = [synthetic_subject(shift=shift, seed=seed) for seed, shift in
                enumerate([(0, 0, 0), (1.5, -1, 0.5), (-1, 1, 1)])]
    subjects.append(subjects[1])
    images = np.stack([s[0] for s in subjects])
    labels = np.stack([s[1] for s in subjects])
    return images, labels, ["s0", "s1", "s2", "s3"]


@pytest.fixture(scope="module")
def identity_model():
    """A freshly built model: its flow head is initialised ~N(0, 1e-5), the identity to within
    1e-3 voxels, so nearest-neighbour warping keeps every label."""
    return models.build("voxelmorph", SHAPE)


def test_template_choice_is_seeded_and_order_independent():
    ids = [f"sub{i:02d}" for i in range(10)]
    picks = {seed: evaluate.choose_template(ids, seed) for seed in range(8)}
    for seed, pick in picks.items():
        expected = sorted(ids)[int(np.random.default_rng(seed).integers(len(ids)))]
        assert pick == expected
        assert evaluate.choose_template(list(reversed(ids)), seed) == pick
    assert len(set(picks.values())) > 1
    assert evaluate.choose_template(ids, 0, template_id="sub03") == "sub03"
    with pytest.raises(ValueError, match="nope"):
        evaluate.choose_template(ids, 0, template_id="nope")


def test_rows_for_every_other_subject_and_self_registration(cohort, identity_model):
    images, labels, ids = cohort
    rows, summary = evaluate.evaluate(identity_model, images, labels, ids, template_id="s1")
    assert [r["moving_id"] for r in rows] == ["s0", "s2", "s3"]
    assert {r["fixed_id"] for r in rows} == {"s1"} and summary["template_id"] == "s1"
    for row in rows:
        for column in evaluate.PAIR_COLUMNS + evaluate.INVERSE_COLUMNS:
            assert column in row, column
        assert row["time_s"] > 0 and row["n_labels"] == 4
        # Identity model: no registration happened, so Dice equals Dice before registration.
        assert row["dice_mean"] == pytest.approx(row["dice_before"], abs=1e-6)
        assert row["folding_count"] == 0
    same = rows[2]  # s3 is s1 registered to itself
    assert same["dice_mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["inverse_dice_mean"] == pytest.approx(1.0, abs=1e-6)
    assert set(same["dice_per_label"]) == {1, 2, 3, 4}
    assert rows[0]["dice_mean"] < 0.99  # a different subject does not overlap perfectly
    assert summary["opposite_direction"] is True and summary["n_pairs"] == 3
    assert summary["inverse"]["dice_mean"]["n"] == 3
    assert summary["forward"]["dice_mean"]["n"] == 3
    assert summary["forward"]["pairs_with_folding"] == 0


def test_seeded_template_and_limits(cohort, identity_model):
    images, labels, ids = cohort
    rows, summary = evaluate.evaluate(identity_model, images, labels, ids, template_seed=5,
                                      inverse=False, max_subjects=2)
    template = evaluate.choose_template(ids, 5)
    assert summary["template_id"] == template and summary["template_seed"] == 5
    assert [r["moving_id"] for r in rows] == [i for i in ids if i != template][:2]
    assert summary["opposite_direction"] is False and "inverse_dice_mean" not in rows[0]
    assert "inverse" not in summary


def test_report_files(cohort, tmp_path):
    images, labels, ids = cohort
    # A model with a nonzero field and a grid it must be rebuilt for (32x32x32 -> 32x48x32).
    wide = np.pad(images, ((0, 0), (0, 0), (8, 8), (0, 0)))
    wide_labels = np.pad(labels, ((0, 0), (0, 0), (8, 8), (0, 0)))
    rows, summary = evaluate.evaluate(perturbed_model(), wide, wide_labels, ids, template_seed=0)
    assert any("rebuilt" in note for note in summary["notes"])
    assert 0 < rows[0]["dice_mean"] <= 1 and rows[0]["dice_mean"] != rows[0]["dice_before"]
    paths = evaluate.write_report(str(tmp_path / "out"), rows, summary)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["dice_per_pair.csv", "dice_per_label.csv", "summary.md", "summary.json"])

    with open(paths["dice_per_pair.csv"]) as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 3
    assert set(evaluate.PAIR_COLUMNS + evaluate.INVERSE_COLUMNS) == set(pairs[0])
    assert float(pairs[0]["dice_mean"]) == pytest.approx(rows[0]["dice_mean"], rel=1e-5)

    with open(paths["dice_per_label.csv"]) as f:
        per_label = list(csv.DictReader(f))
    assert len(per_label) == 3 * 4
    assert {"moving_id", "fixed_id", "label", "dice", "dice_inverse"} == set(per_label[0])

    with open(paths["summary.json"]) as f:
        saved = json.load(f)
    assert saved["model"]["name"] == "voxelmorph" and saved["n_pairs"] == 3
    assert saved["forward"]["dice_mean"]["mean"] == pytest.approx(
        np.mean([r["dice_mean"] for r in rows]))
    assert set(saved["forward"]["per_label"]) == {"1", "2", "3", "4"}
    assert "inverse" in saved and "time_s" in saved

    text = open(paths["summary.md"]).read()
    assert "voxelmorph" in text and "| Dice |" in text and "±" in text
    assert "time per pair" in text and "folding % (brain mask)" in text


def test_command_line_on_a_dataset_dir(cohort, tmp_path):
    images, labels, ids = cohort
    data_dir = tmp_path / "data"
    os.makedirs(data_dir / "images")
    os.makedirs(data_dir / "labels")
    for image, label, sid in zip(images, labels, ids):
        nib.save(nib.Nifti1Image(image, AFFINE), str(data_dir / "images" / f"{sid}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(data_dir / "labels" / f"{sid}.nii.gz"))
    (tmp_path / "subjects.txt").write_text("# validation\ns0\ns1\n\ns2  # third\n")
    model_dir = str(tmp_path / "model")
    models.save(perturbed_model(), model_dir)
    out = tmp_path / "eval"

    argv = ["--model", model_dir, "--data_dir", str(data_dir), "--subjects",
            str(tmp_path / "subjects.txt"), "--template_seed", "3", "--out", str(out),
            "--device", "cpu"]
    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    fv(["evaluate"] + argv)
    rows, summary, paths = evaluate.run_from_flags(fv)
    assert summary["n_subjects"] == 3 and len(rows) == 2
    assert summary["template_id"] == evaluate.choose_template(["s0", "s1", "s2"], 3)
    for name in ("dice_per_pair.csv", "dice_per_label.csv", "summary.md", "summary.json"):
        assert (out / name).is_file()
    assert [n for n in os.listdir(out) if ".tmp" in n] == []

    # The same through `python -m` (flags defined under __main__), into another folder.
    argv[argv.index(str(out))] = str(tmp_path / "eval_cli")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "mdregnet.evaluate"] + argv, cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Dice |" in result.stdout and str(tmp_path / "eval_cli") in result.stdout
    with open(tmp_path / "eval_cli" / "summary.json") as f:
        cli_summary = json.load(f)
    assert cli_summary["template_id"] == summary["template_id"]
    assert cli_summary["forward"]["dice_mean"]["mean"] == pytest.approx(
        summary["forward"]["dice_mean"]["mean"], abs=1e-6)

    # A bad data folder is one clear error line, exit status 1.
    argv[argv.index(str(data_dir))] = str(tmp_path / "no_data")
    result = subprocess.run([sys.executable, "-m", "mdregnet.evaluate"] + argv, cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("mdregnet.evaluate: error: ")
    assert "no_data" in result.stderr


@pytest.mark.realdata
def test_real_oasis_self_registration(oasis_pair_3d, identity_model):
    """Real OASIS label maps (35 structures): a subject registered to itself scores Dice 1 in
    both directions, another subject less."""
    moving, fixed, moving_seg, fixed_seg = oasis_pair_3d
    images = np.stack([moving, fixed, moving]) / max(moving.max(), fixed.max())
    labels = np.stack([moving_seg, fixed_seg, moving_seg])
    rows, summary = evaluate.evaluate(identity_model, images, labels, ["a", "b", "a_copy"],
                                      template_id="a")
    by_id = {r["moving_id"]: r for r in rows}
    assert by_id["a_copy"]["dice_mean"] == pytest.approx(1.0, abs=1e-6)
    assert by_id["a_copy"]["inverse_dice_mean"] == pytest.approx(1.0, abs=1e-6)
    assert by_id["a_copy"]["n_labels"] > 20
    assert by_id["b"]["dice_mean"] < 0.95
    assert any("rebuilt" in note for note in summary["notes"])  # 32x48x48 grid
