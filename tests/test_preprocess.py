"""Tests of mdregnet.preprocess: geometry, affine registration, one real IXI subject, the CLI."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from absl import flags
from scipy import ndimage

from conftest import REPO, shared_path
from mdregnet import assets, io, preprocess

LPS = np.diag([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------
def _phantom(shape, seed=0, radii=None):
    """`(image, labels)`: an ellipsoidal "brain" with smooth random texture and 5 labels.

    The texture (Gaussian-smoothed noise, sigma 3 voxels, full contrast inside the brain) makes
    the volume asymmetric, so a rotation or shift is identifiable; the image is smoothed once more
    (sigma 1) so that its edge is not a step; labels are the texture's quintiles in the brain.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    centre = (np.asarray(shape) - 1) / 2.0
    radii = np.asarray(radii if radii is not None else np.asarray(shape) * 0.32)
    brain = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    lo, hi = np.percentile(texture[brain], [1, 99])
    texture = np.clip((texture - lo) / (hi - lo), 0.0, 1.0)
    image = ndimage.gaussian_filter(np.where(brain, 0.2 + 0.8 * texture, 0.0), 1.0)
    image = image.astype(np.float32)
    edges = np.quantile(texture[brain], [0.2, 0.4, 0.6, 0.8])
    labels = np.where(brain, 1 + np.digitize(texture, edges), 0).astype(np.int32)
    return image, labels


def _transform(volume, matrix, offset, order):
    """`out(o) = volume(matrix @ o + offset)` (scipy), 0 outside."""
    return ndimage.affine_transform(volume, matrix, offset=offset, order=order, mode="constant",
                                    cval=0.0)


def _rotation(degrees_x, degrees_z):
    ax, az = np.deg2rad(degrees_x), np.deg2rad(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
def test_to_sitk_keeps_physical_points():
    # IXI's PSR orientation with an origin: a swapped axis or a missed RAS->LPS flip moves points.
    affine = np.array([[0, 0, 2, -88.2], [-2, 0, 0, 118.2], [0, 2, 0, -135.3], [0, 0, 0, 1.0]])
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = preprocess.to_sitk(array, affine)
    assert image.GetSize() == (4, 5, 6)
    for ijk in [(0, 0, 0), (3, 1, 2), (1, 4, 5)]:
        expected = LPS @ (affine[:3, :3] @ np.asarray(ijk) + affine[:3, 3])
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), expected, atol=1e-6)
        assert image[ijk] == array[ijk]
    np.testing.assert_array_equal(preprocess.from_sitk(image), array)


def test_target_grid_is_ras_centred_on_the_brain():
    affine = np.array([[0, 0, 2, -88.0], [-2, 0, 0, 118.0], [0, 2, 0, -135.0], [0, 0, 0, 1.0]])
    mask = np.zeros((60, 50, 40), bool)
    mask[10:41, 20:35, 5:30] = True
    template = preprocess.Template(image=mask.astype(np.float32), mask=mask, affine=affine,
                                   path="t.nii.gz")
    grid = preprocess.target_grid(template, shape=(32, 48, 32))
    assert grid.shape == (32, 48, 32) and grid.spacing == (2.0, 2.0, 2.0)
    assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")
    np.testing.assert_allclose(grid.affine[:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-9)
    # The box centre is the brain's bounding-box centre, within half a template voxel (snapping).
    box_centre = grid.affine[:3, :3] @ ((np.array(grid.shape) - 1) / 2) + grid.affine[:3, 3]
    brain_centre = affine[:3, :3] @ np.array([25.0, 27.0, 17.0]) + affine[:3, 3]
    assert np.abs(box_centre - brain_centre).max() <= 1.0 + 1e-9
    # Output voxels lie on template voxel centres (integer template indices).
    vox = np.linalg.solve(affine[:3, :3], grid.affine[:3, 3] - affine[:3, 3])
    np.testing.assert_allclose(vox, np.round(vox), atol=1e-9)
    assert grid.brain_fits and "cropped by" in grid.description
    assert not preprocess.target_grid(template, shape=(16, 16, 16)).brain_fits
    half = preprocess.target_grid(template, shape=(32, 48, 32), spacing="1")
    assert half.spacing == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="divisible by 16"):
        preprocess.target_grid(template, shape=(80, 90, 80))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_register_affine_recovers_known_affine():
    shape = (64, 64, 64)
    template, labels = _phantom(shape, seed=3)
    # moving(o) = template(A o + b): rotated 8 and 10 degrees, scaled 1.05 on one axis, shifted.
    matrix = _rotation(8.0, 10.0) @ np.diag([1.05, 1.0, 1.0])
    centre = (np.array(shape) - 1) / 2.0
    offset = centre - matrix @ centre + np.array([3.0, -2.0, 2.5])
    moving = _transform(template, matrix, offset, order=1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-60.0, 10.0, -40.0]
    fixed_s, moving_s = preprocess.to_sitk(template, affine), preprocess.to_sitk(moving, affine)

    transform = preprocess.register_affine(fixed_s, moving_s)
    assert isinstance(transform, sitk.Transform)
    aligned = preprocess.from_sitk(sitk.Resample(moving_s, fixed_s, transform, sitk.sitkLinear))
    brain = labels > 0
    before = np.corrcoef(template[brain], moving[brain])[0, 1]
    after = np.corrcoef(template[brain], aligned[brain])[0, 1]
    assert before < 0.6, before
    assert after > 0.95, after

    # The recovered point mapping matches A^-1 (p - b) (fixed voxel -> moving voxel): catches a
    # wrong direction or a swapped axis that a symmetric image could hide.
    pts = np.argwhere(brain)[::97].astype(np.float64)
    got = []
    for p in pts:
        y = np.asarray(transform.TransformPoint(tuple(LPS @ (affine[:3, :3] @ p + affine[:3, 3]))))
        got.append(np.linalg.solve(affine[:3, :3], LPS @ y - affine[:3, 3]))
    expected = (np.linalg.inv(matrix) @ (pts - offset).T).T
    error = np.linalg.norm(np.asarray(got) - expected, axis=1)
    assert error.mean() < 0.5, error.mean()  # voxels; sub-voxel for a noise-free phantom


def test_register_affine_rejects_bad_arguments():
    image = preprocess.to_sitk(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="metric"):
        preprocess.register_affine(image, image, metric="mse")
    with pytest.raises(ValueError, match="per level"):
        preprocess.register_affine(image, image, shrink_factors=(2, 1), smoothing_sigmas=(1,))


# ------------------------------------------------------------------------------------------------
# One real IXI subject
# ------------------------------------------------------------------------------------------------
IXI_TEMPLATE = "IXI012-HH-1211"
IXI_MOVING = "IXI216-HH-1635"  # head ~20 mm lower than the template's in the scanner


@pytest.fixture(scope="module")
def ixi_run(tmp_path_factory):
    t1 = shared_path("ixi", "T1", f"{IXI_MOVING}_T1.nii.gz")
    lab = shared_path("ixi", "labels", f"{IXI_MOVING}_T1_DLMUSE.nii.gz")
    t1_t = shared_path("ixi", "T1", f"{IXI_TEMPLATE}_T1.nii.gz")
    lab_t = shared_path("ixi", "labels", f"{IXI_TEMPLATE}_T1_DLMUSE.nii.gz")
    tmp = tmp_path_factory.mktemp("ixi")
    # The template: another subject, skull-stripped (labels > 0) and normalised, as a NIfTI file.
    image, img = io.load_image(t1_t)
    labels_t, _ = io.load_labels(lab_t)
    stripped = io.normalize_intensity(image, labels_t > 0) * (labels_t > 0)
    template_path = str(tmp / "template_brain.nii.gz")
    io.save_volume(template_path, stripped, img.affine, dtype=np.float32)
    template = preprocess.load_template(template_path)

    out = tmp / "out"
    moving = preprocess.preprocess_subject(t1, out, "moving", label_path=lab, template=template,
                                           shape=(80, 96, 80))
    fixed = preprocess.preprocess_subject(t1_t, out, "fixed", label_path=lab_t, template=template,
                                          shape=(80, 96, 80))
    return {"moving": moving, "fixed": fixed, "labels_in": io.load_labels(lab)[0],
            "labels_t": labels_t}


@pytest.mark.slow
@pytest.mark.realdata
def test_ixi_subject_outputs(ixi_run):
    stats = ixi_run["moving"]
    img = nib.load(stats["image"])
    lab = nib.load(stats["labels"])
    image = np.asanyarray(img.dataobj)
    labels = np.asanyarray(lab.dataobj)
    assert image.shape == labels.shape == (80, 96, 80)
    assert all(s % 16 == 0 for s in image.shape)
    assert img.get_data_dtype() == np.float32 and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.99
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_allclose(img.affine, lab.affine)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 2.0, atol=1e-6)
    # Skull stripped: no intensity farther from the brain than the strip mask (brain dilated by one
    # voxel) plus trilinear interpolation reach: sqrt(5) ~ 2.24 voxels, tested at 2.5.
    distance = ndimage.distance_transform_edt(labels == 0)
    assert image[distance > 2.5].max() == 0.0
    assert image[distance > 1.0].mean() < 0.05
    # The label set survives nearest-neighbour resampling, but for at most a few tiny labels.
    labels_in = ixi_run["labels_in"]
    before = set(np.unique(labels_in).tolist())
    after = set(np.unique(labels).tolist())
    assert after <= before
    lost = before - after
    assert len(lost) <= 3 and all((labels_in == v).sum() < 50 for v in lost), lost
    assert stats["labels_lost"] == sorted(lost)
    # The brain lies inside the box: no brain voxel on any of the six faces.
    brain = labels > 0
    for axis in range(3):
        assert not brain.take(0, axis=axis).any() and not brain.take(-1, axis=axis).any()
    assert stats["brain_on_faces"] == 0
    assert abs(brain.sum() - stats["brain_voxels_out"]) == 0
    assert 0.85 < stats["scale"] < 1.15


@pytest.mark.slow
@pytest.mark.realdata
def test_ixi_affine_alignment_improves_overlap(ixi_run):
    moving, fixed = ixi_run["moving"], ixi_run["fixed"]
    np.testing.assert_allclose(nib.load(moving["image"]).affine, nib.load(fixed["image"]).affine)
    brain_m = np.asanyarray(nib.load(moving["labels"]).dataobj) > 0
    brain_f = np.asanyarray(nib.load(fixed["labels"]).dataobj) > 0
    after = _dice(brain_m, brain_f)
    # Naive: the two raw label maps on their common scanner grid, no alignment.
    naive = _dice(ixi_run["labels_in"] > 0, ixi_run["labels_t"] > 0)
    assert after > 0.9, after
    assert after > naive + 0.1, (naive, after)
    # The template's own subject is registered (almost) onto itself.
    matrix = np.asarray(fixed["transform"]["matrix"])
    assert np.abs(matrix - np.eye(3)).max() < 0.03, matrix
    assert np.linalg.norm(fixed["transform"]["translation"]) < 1.5  # mm


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _write_cohort(root, corrupt=None):
    """Two phantom subjects `a_T1`, `b_T1` with a bright "skull" and `*_T1_seg` label maps; the
    second is a rotated and shifted copy of the first. `corrupt` names one image to truncate."""
    shape = (40, 48, 40)
    image, labels = _phantom(shape, seed=1, radii=(12, 15, 12))
    centre = (np.array(shape) - 1) / 2.0
    matrix = _rotation(6.0, -5.0)
    offset = centre - matrix @ centre + np.array([2.0, -1.5, 1.0])
    moved = (_transform(image, matrix, offset, 1), _transform(labels, matrix, offset, 0))
    subjects = {"a_T1": (image, labels), "b_T1": moved}
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -48.0, -40.0]
    os.makedirs(root / "images")
    os.makedirs(root / "labels")
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    skull = ((((grid - centre) / np.array([17.0, 20.0, 17.0])) ** 2).sum(-1) <= 1.0)
    for sid, (img, lab) in subjects.items():
        head = np.where(skull & (lab == 0), 0.9, img) * 200.0
        io.save_volume(str(root / "images" / f"{sid}.nii.gz"), head.astype(np.float32), affine)
        io.save_volume(str(root / "labels" / f"{sid}_seg.nii.gz"), lab.astype(np.uint8), affine)
    if corrupt is not None:
        path = root / "images" / f"{corrupt}.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return str(path)
    return None


def _args(root, *extra):
    # The synthetic phantoms are aligned to the first subject, not to the shipped MNI152 brain.
    return ["--images", str(root / "images"), "--labels", str(root / "labels"),
            "--out", str(root / "out"), "--shape", "48,64,48", "--template", "first", *extra]


def _run_main(argv):
    fv = flags.FlagValues()
    preprocess.define_flags(fv)
    fv(["mdregnet.preprocess", *argv])
    return preprocess.run_from_flags(fv)


def test_find_jobs_matches_ixi_names(tmp_path):
    for folder, names in (("T1", ["s1_T1", "s10_T1", "s2_T1"]),
                          ("labels", ["s1_T1_DLMUSE", "s10_T1_DLMUSE"])):
        os.makedirs(tmp_path / folder)
        for name in names:
            (tmp_path / folder / f"{name}.nii.gz").write_bytes(b"")
    jobs = {j.id: j for j in preprocess.find_jobs(tmp_path / "T1", tmp_path / "labels")}
    assert sorted(jobs) == ["s10_T1", "s1_T1", "s2_T1"]
    assert jobs["s1_T1"].labels.endswith("s1_T1_DLMUSE.nii.gz")
    assert jobs["s10_T1"].labels.endswith("s10_T1_DLMUSE.nii.gz")
    assert jobs["s1_T1"].error is None
    assert "s2_T1" in jobs["s2_T1"].error  # no label file: this subject fails, not the batch
    with pytest.raises(ValueError, match="--labels or --masks"):
        preprocess.find_jobs(tmp_path / "T1")


def test_cli_skips_done_subjects(tmp_path, capsys):
    _write_cohort(tmp_path)
    assert _run_main(_args(tmp_path, "--workers", "1")) == 0
    first = capsys.readouterr().out
    assert "2 done, 0 skipped" in first, first
    outputs = [tmp_path / "out" / kind / f"{sid}.nii.gz"
               for kind in ("images", "labels") for sid in ("a_T1", "b_T1")]
    mtimes = [os.stat(p).st_mtime_ns for p in outputs]
    lab_a = np.asanyarray(nib.load(outputs[2]).dataobj)
    lab_b = np.asanyarray(nib.load(outputs[3]).dataobj)
    assert lab_a.shape == (48, 64, 48)
    assert _dice(lab_a > 0, lab_b > 0) > 0.9  # b was rotated and shifted; aligned to a

    assert _run_main(_args(tmp_path, "--workers", "1")) == 0
    second = capsys.readouterr().out
    assert "0 done, 2 skipped" in second, second
    assert [os.stat(p).st_mtime_ns for p in outputs] == mtimes  # nothing rewritten

    os.remove(outputs[1])  # b's image gone: b is redone, a still skipped
    assert _run_main(_args(tmp_path, "--workers", "1")) == 0
    assert "1 done, 1 skipped" in capsys.readouterr().out
    assert os.stat(outputs[0]).st_mtime_ns == mtimes[0]


@pytest.mark.slow
def test_cli_reports_a_corrupt_subject_and_goes_on(tmp_path):
    # The first subject (the default template) is corrupt: the next one becomes the template, the
    # corrupt one is reported in one line naming its file, the batch finishes, exit status 1.
    bad = _write_cohort(tmp_path, corrupt="a_T1")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mdregnet.preprocess",
                           *_args(tmp_path, "--workers", "2")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 done, 0 skipped (outputs exist), 1 failed" in proc.stdout, proc.stdout
    failed = [line for line in proc.stdout.splitlines() if "FAILED a_T1" in line]
    assert len(failed) == 1 and bad in failed[0], proc.stdout
    assert (tmp_path / "out" / "images" / "b_T1.nii.gz").exists()
    assert (tmp_path / "out" / "labels" / "b_T1.nii.gz").exists()
    assert not (tmp_path / "out" / "images" / "a_T1.nii.gz").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_cli_default_template_puts_a_real_subject_on_the_shipped_models_grid(tmp_path, capsys):
    """Default `--template mni152`: a raw IXI subject lands on the MNI152 80x112x80 grid of the
    shipped models, scaled up a little (IXI heads are smaller than the MNI152 average)."""
    subject = f"{IXI_MOVING}_T1"
    for folder, name in (("T1", f"{subject}.nii.gz"), ("labels", f"{subject}_DLMUSE.nii.gz")):
        os.makedirs(tmp_path / folder, exist_ok=True)
        os.symlink(shared_path("ixi", folder, name), tmp_path / folder / name)
    assert _run_main(["--images", str(tmp_path / "T1"), "--labels", str(tmp_path / "labels"),
                      "--out", str(tmp_path / "out"), "--shape", "80,112,80"]) == 0
    assert "1 done" in capsys.readouterr().out
    img = nib.load(str(tmp_path / "out" / "images" / f"{subject}.nii.gz"))
    fixed = nib.load(assets.default_pair().fixed)
    assert img.shape == fixed.shape == (80, 112, 80)
    np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-4)
    labels = np.asanyarray(nib.load(str(tmp_path / "out" / "labels" / f"{subject}.nii.gz")).dataobj)
    template_brain = np.asanyarray(fixed.dataobj) > 0
    assert _dice(labels > 0, template_brain) > 0.85
