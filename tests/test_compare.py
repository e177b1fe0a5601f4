"""`experiments/compare.py`: several methods on the same pairs, one table."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from absl import flags

from mdregnet import evaluate, infer, layers, metrics, models

from test_infer import AFFINE, REPO, synthetic_subject

SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)  # the zooms of AFFINE: ANTs must work in mm and convert back to voxels


def _load_compare():
    spec = importlib.util.spec_from_file_location(
        "experiments_compare", os.path.join(REPO, "experiments", "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


@pytest.fixture(scope="module")
def cohort():
    """Four synthetic subjects, shifted against each other, with 4-label maps."""
    subjects = [synthetic_subject(shift=shift, seed=seed) for seed, shift in
                enumerate([(0, 0, 0), (1.5, -1, 0.5), (-1, 1, 1), (0.5, 1.5, -1)])]
    images = np.stack([s[0] for s in subjects])
    labels = np.stack([s[1] for s in subjects])
    return images, labels, ["s0", "s1", "s2", "s3"]


@pytest.fixture(scope="module")
def dataset(cohort, tmp_path_factory):
    """The cohort as a dataset folder (images/, labels/) on AFFINE's 2 mm grid."""
    images, labels, ids = cohort
    root = tmp_path_factory.mktemp("data")
    for folder in ("images", "labels"):
        os.makedirs(root / folder)
    for image, label, sid in zip(images, labels, ids):
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / "images" / f"{sid}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / "labels" / f"{sid}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained voxelmorph (flow head ~N(0, 1e-5): the identity to within 1e-3 voxels)."""
    directory = str(tmp_path_factory.mktemp("model") / "voxelmorph")
    models.save(models.build("voxelmorph", SHAPE), directory)
    return directory


def test_affine_rows_are_the_dice_before_registration(cohort):
    images, labels, ids = cohort
    rows, summary = compare.run(images, labels, ids, methods=["affine"], template_seed=1,
                                log=lambda _: None)
    template = evaluate.choose_template(ids, 1)
    t = ids.index(template)
    assert summary["settings"]["template_id"] == template
    assert [r["moving_id"] for r in rows] == [i for i in ids if i != template]
    for row in rows:
        i = ids.index(row["moving_id"])
        _, before = metrics.dice(labels[t], labels[i])  # computed here, independently
        assert row["method"] == "affine" and row["fixed_id"] == template
        assert row["dice_before"] == pytest.approx(before, abs=1e-12)
        assert row["dice_mean"] == pytest.approx(before, abs=1e-12)
        assert 0.3 < before < 0.99  # shifted subjects: partial overlap, so the check has teeth
        assert row["folding_count"] == 0 and row["folding_percent"] == 0.0
        assert row["sdlogj"] == 0.0 and row["time_s"] == 0.0
    entry = summary["methods"][0]
    assert entry["status"] == "ok" and entry["summary"]["forward"]["dice_mean"]["n"] == 3
    assert entry["summary"]["forward"]["dice_mean"]["mean"] == pytest.approx(
        np.mean([r["dice_before"] for r in rows]))
    assert "| affine | 3 |" in compare.table(summary)
    # max_pairs keeps the first moving subjects, in id order (as evaluate's max_subjects)
    few, _ = compare.run(images, labels, ids, methods=["affine"], template_seed=1, max_pairs=2,
                         log=lambda _: None)
    assert [r["moving_id"] for r in few] == [r["moving_id"] for r in rows][:2]


def test_unknown_method_and_bad_models_flag(cohort):
    images, labels, ids = cohort
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        compare.run(images, labels, ids, methods=["nope"], log=lambda _: None)
    with pytest.raises(ValueError, match="name=dir"):
        compare.parse_models("mdregnet")
    assert compare.parse_models(" a=x/y , b=z ") == [("a", "x/y"), ("b", "z")]


def test_syn_is_skipped_when_antspyx_is_missing(cohort, monkeypatch):
    images, labels, ids = cohort
    monkeypatch.setitem(sys.modules, "ants", None)  # makes `import ants` fail
    messages = []
    rows, summary = compare.run(images, labels, ids, methods=["affine", "syn"],
                                log=messages.append)
    assert {r["method"] for r in rows} == {"affine"}
    syn = summary["methods"][1]
    assert syn["name"] == "syn" and syn["status"].startswith("not installed")
    assert any("skipping syn" in m for m in messages)
    assert "| syn | 0 | not installed" in compare.table(summary)


def test_command_line_with_a_model_and_the_files(dataset, model_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare.py", "--data_dir", str(dataset), "--subjects", "all",
            "--methods", "affine,syn,models", "--models",
            f"vm={model_dir},gone={tmp_path / 'no_model'}", "--max_pairs", "2",
            "--template_seed", "0", "--out", str(out), "--device", "cpu",
            "--refine_steps", "0,5"]
    fv = flags.FlagValues()
    compare.define_flags(fv)
    fv(argv)
    rows, summary, paths = compare.run_from_flags(fv, argv)

    have_ants = compare.import_ants()[0] is not None
    ran = ["affine", "vm", "vm+refine5"] + (["syn"] if have_ants else [])
    assert sorted({r["method"] for r in rows}) == sorted(ran)
    assert len(rows) == 2 * len(ran)
    assert summary["settings"]["spacing_mm"] == list(SPACING)
    status = {e["name"]: e["status"] for e in summary["methods"]}
    assert [e["name"] for e in summary["methods"]] == ["affine", "syn", "vm", "vm+refine5",
                                                       "gone", "gone+refine5"]
    assert status["gone"] == "directory not found" and status["vm"] == "ok"

    affine = {r["moving_id"]: r for r in rows if r["method"] == "affine"}
    for row in (r for r in rows if r["method"] == "vm"):
        # An untrained model is the identity to ~1e-3 voxels: Dice as before registration.
        assert row["dice_mean"] == pytest.approx(affine[row["moving_id"]]["dice_mean"], abs=1e-6)
        assert row["time_s"] > 0 and row["folding_count"] == 0
    vm = {r["moving_id"]: r for r in rows if r["method"] == "vm"}
    for row in (r for r in rows if r["method"] == "vm+refine5"):
        # Five steps of test-time refinement move the labels towards the template's.
        assert row["dice_mean"] > vm[row["moving_id"]]["dice_mean"]
        assert row["time_s"] > vm[row["moving_id"]]["time_s"] and row["folding_count"] == 0
    if have_ants:
        for row in (r for r in rows if r["method"] == "syn"):
            assert row["dice_mean"] > affine[row["moving_id"]]["dice_mean"] + 0.02
            assert row["time_s"] > 0

    assert sorted(os.listdir(out)) == ["compare.csv", "compare.json", "compare.md"]
    with open(paths["compare.csv"]) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows) and set(records[0]) == set(compare.CSV_COLUMNS)
    with open(paths["compare.json"]) as f:
        saved = json.load(f)
    assert saved["settings"]["n_pairs"] == 2 and len(saved["rows"]) == len(rows)
    text = open(paths["compare.md"]).read()
    for name in ("affine", "syn", "vm", "gone"):
        assert f"| {name} |" in text
    assert "| gone | 0 | directory not found" in text
    assert "runtime 0" in text and "--max_pairs 2" in text and "time per pair (s)" in text


def test_script_runs_as_main(dataset, tmp_path):
    """`python experiments/compare.py` defines its flags under __main__ and prints the table."""
    out = tmp_path / "cli"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "compare.py"),
                             "--data_dir", str(dataset), "--subjects", "all", "--methods",
                             "affine", "--out", str(out)], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| affine | 3 |" in result.stdout and (out / "compare.md").is_file()


# ------------------------------------------------------------------------------------------------
# ANTs SyN (only with antspyx installed)
# ------------------------------------------------------------------------------------------------
SHIFT = np.array([2, -1, 0])  # voxels along array axes 0, 1, 2


def _shifted(fixed, fixed_labels):
    """`(fixed, moving, fixed_labels, moving_labels)` with moving = fixed translated by SHIFT
    (np.roll: the object moves by +SHIFT), so `moving(p + SHIFT) = fixed(p)`: the displacement
    is SHIFT everywhere inside the object."""
    moving = np.roll(fixed, tuple(SHIFT), axis=(0, 1, 2))
    moving_labels = np.roll(fixed_labels, tuple(SHIFT), axis=(0, 1, 2))
    return fixed, moving, fixed_labels, moving_labels


@pytest.fixture(scope="module")
def shifted_pair():
    """The synthetic subject and its translated copy."""
    return _shifted(*synthetic_subject(seed=4))


@pytest.fixture(scope="module")
def textured_shifted_pair():
    """The same with a sinusoidal texture (period 12 voxels) inside the object. Local CC has no
    signal in the plain subject's flat regions, where ANTs' default SyN stops at ~75% of the
    shift; the texture drives every voxel (measured: mean error ~0.18 voxel vs ~0.47)."""
    image, labels = synthetic_subject(seed=4)
    grid = np.indices(SHAPE).astype(np.float32)
    texture = np.prod([np.sin(2 * np.pi * grid[a] / 12.0) for a in range(3)], axis=0)
    image = image * (0.6 + 0.4 * texture)
    return _shifted((image / image.max()).astype(np.float32), labels)


def test_syn_recovers_a_known_shift(textured_shifted_pair):
    pytest.importorskip("ants")
    fixed, moving, fixed_labels, moving_labels = textured_shifted_pair
    disp, seconds = compare.register_syn(fixed, moving, SPACING)
    assert disp.shape == SHAPE + (3,) and disp.dtype == np.float32 and seconds > 0
    inside = fixed_labels > 0
    mean = disp[inside].mean(axis=0)
    # Recovered to ~0.2 voxel (ANTs' defaults stop at half resolution, 40x20x0 iterations, and
    # smooth the field); a sign error, a swapped axis or a missing division by the 2 mm spacing
    # is off by >= 1 voxel in some component.
    assert np.all(np.abs(disp[inside] - SHIFT).mean(axis=0) < 0.5), mean
    assert np.all(np.abs(mean - SHIFT) < 0.5), mean
    _, before = metrics.dice(fixed_labels, moving_labels)
    _, after = metrics.dice(fixed_labels, infer.warp_labels(moving_labels, disp))
    assert after > before + 0.1


def test_package_warp_matches_ants_apply_transforms(shifted_pair, tmp_path):
    ants = pytest.importorskip("ants")
    fixed, moving, fixed_labels, moving_labels = shifted_pair
    fixed_img, moving_img = compare.ants_image(fixed, SPACING), compare.ants_image(moving, SPACING)
    result = compare.syn_registration(fixed_img, moving_img, str(tmp_path / "syn_"))
    transforms = result["fwdtransforms"]
    disp = compare.warp_field_to_disp(transforms, SPACING)

    ants_labels = ants.apply_transforms(fixed_img, compare.ants_image(moving_labels, SPACING),
                                        transforms, interpolator="nearestNeighbor").numpy()
    ours = infer.warp_labels(moving_labels, disp)
    # Nearest neighbour on both sides; only exact .5 ties could round differently.
    assert np.mean(ours == np.round(ants_labels)) > 0.999
    assert np.mean(ours == fixed_labels) > np.mean(moving_labels == fixed_labels)

    ants_image = ants.apply_transforms(fixed_img, moving_img, transforms,
                                       interpolator="linear").numpy()
    warped = np.asarray(layers.warp(moving[None, ..., None], disp[None]))[0, ..., 0]
    assert np.max(np.abs(warped - ants_image)) < 1e-4  # trilinear both, float32 round-off
    assert np.abs(warped - fixed).mean() < 0.5 * np.abs(moving - fixed).mean()

    # A non-identity affine in the transform list is refused, not silently dropped.
    tx = ants.create_ants_transform(transform_type="AffineTransform", dimension=3,
                                    matrix=np.eye(3), translation=(1.0, 0.0, 0.0))
    ants.write_transform(tx, str(tmp_path / "shifted.mat"))
    with pytest.raises(ValueError, match="identity affine"):
        compare.warp_field_to_disp([transforms[0], str(tmp_path / "shifted.mat")], SPACING)
