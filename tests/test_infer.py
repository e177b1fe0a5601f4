"""`mdregnet.infer`: one registration from files to files, its outputs, notes and failure modes."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from absl import app, flags
from scipy import ndimage

from mdregnet import assets, infer, io, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 32, 32)
# RAS affine with 2 mm voxels and an offset: the ITK export flips x and y (LPS) and scales by 2.
AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -34], [0, 0, 2.0, -20], [0, 0, 0, 1]])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_subject(shape=SHAPE, shift=(0.0, 0.0, 0.0), seed=0):
    """A smooth ellipsoid 'brain' with 4 labels (its quadrants) and intensities in [0, 1]."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2.0 + np.array(shift)
    radius = np.array(shape) * 0.36
    r2 = sum(((grid[a] - centre[a]) / radius[a]) ** 2 for a in range(3))
    inside = r2 < 1.0
    labels = (inside * (1 + (grid[0] > centre[0]) + 2 * (grid[1] > centre[1]))).astype(np.int32)
    image = np.where(inside, 0.35 + 0.12 * labels, 0.0) + 0.03 * rng.random(shape)
    image = ndimage.gaussian_filter(image, 1.0)
    return (image / image.max()).astype(np.float32), labels


def save_nifti(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def perturbed_model(name="voxelmorph", shape=SHAPE):
    """A tiny model whose field is clearly nonzero: the flow head gets random weights of order
    1e-2 and a bias (a translation of about a voxel per component)."""
    model = models.build(name, shape)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if layer.name in ("flow", "S1_svf", "S2_svf", "S3_svf"):
            kernel, bias = layer.get_weights()
            layer.set_weights([rng.normal(0, 1e-2, kernel.shape).astype(np.float32),
                               np.array([1.2, -0.9, 0.7], np.float32)[:bias.shape[0]]])
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("model") / "voxelmorph")
    models.save(perturbed_model(), directory)
    return directory


@pytest.fixture(scope="module")
def mni_model_dir(tmp_path_factory):
    """The same kind of model saved for the shipped models' grid, 80x112x80 (sets the size of
    the --preprocess grid)."""
    directory = str(tmp_path_factory.mktemp("model") / "voxelmorph_mni")
    models.save(perturbed_model(shape=(80, 112, 80)), directory)
    return directory


@pytest.fixture
def pair(tmp_path):
    """Files of a moving (shifted, intensities x 255) and a fixed subject with label maps."""
    fixed, fixed_seg = synthetic_subject(seed=1)
    moving, moving_seg = synthetic_subject(shift=(1.5, -1.0, 0.5), seed=2)
    return {"moving": save_nifti(tmp_path / "moving.nii.gz", moving * 255.0),
            "fixed": save_nifti(tmp_path / "fixed.nii.gz", fixed),
            "moving_labels": save_nifti(tmp_path / "moving_seg.nii.gz", moving_seg),
            "fixed_labels": save_nifti(tmp_path / "fixed_seg.nii.gz", fixed_seg)}


def pull_back(volume, disp, order=1):
    """Reference warp with scipy: `volume(p + disp(p))`, 0 outside (CONVENTIONS.md)."""
    coords = np.indices(disp.shape[:-1]).astype(np.float64) + np.moveaxis(disp, -1, 0)
    return ndimage.map_coordinates(volume, coords, order=order, mode="grid-constant", cval=0.0)


def leftovers(folder):
    """Temporary files or folders left behind by an atomic write."""
    return [n for n in os.listdir(folder) if ".tmp" in n]


def test_register_writes_every_output(pair, model_dir, tmp_path):
    out = tmp_path / "reg"
    summary = infer.register(model_dir, pair["moving"], pair["fixed"], str(out),
                             moving_labels=pair["moving_labels"],
                             fixed_labels=pair["fixed_labels"])
    for name in infer.OUTPUT_FILES:
        assert (out / name).is_file(), name
    assert leftovers(tmp_path) == [] and leftovers(out) == []

    for name in ("warped", "disp", "disp_itk", "inverse_disp", "inverse_disp_itk",
                 "jacobian_det", "warped_labels"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5, err_msg=name)

    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()
    assert disp.shape == (*SHAPE, 3)
    # The bias makes the field clearly nonzero (a fraction of a voxel), and it is smooth.
    assert 0.05 < np.abs(disp).mean() < 5.0
    itk = nib.load(str(out / "disp_itk.nii.gz"))
    assert itk.shape == (*SHAPE, 1, 3)
    assert int(itk.header["intent_code"]) == 1007
    # mm in LPS: x and y flip sign (RAS affine), every component scales by the 2 mm voxels.
    np.testing.assert_allclose(itk.get_fdata()[:, :, :, 0, :], disp * [-2.0, -2.0, 2.0],
                               atol=1e-4)
    assert nib.load(str(out / "inverse_disp_itk.nii.gz")).shape == (*SHAPE, 1, 3)

    # The saved warped image is the (normalised) moving image pulled back by the saved field:
    # catches a sign, axis or crop error between the two files. Tolerance: float32 round-off.
    moving = io.normalize_intensity(nib.load(pair["moving"]).get_fdata())
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(warped, pull_back(moving, disp), atol=2e-3)
    warped_seg = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    assert np.issubdtype(warped_seg.dtype, np.integer)
    moving_seg = np.asarray(nib.load(pair["moving_labels"]).dataobj)
    assert np.mean(warped_seg == pull_back(moving_seg, disp, order=0)) > 0.999

    jac = nib.load(str(out / "jacobian_det.nii.gz")).get_fdata()
    assert jac.shape == SHAPE and abs(float(np.median(jac)) - 1.0) < 0.5

    with open(out / "summary.json") as f:
        saved = json.load(f)
    assert saved == summary
    for key in ("model", "shape", "time_s", "folding", "sdlogj", "dice", "notes", "outputs",
                "resampled", "padding", "inverse"):
        assert key in saved, key
    assert saved["model"]["name"] == "voxelmorph"
    assert saved["shape"] == list(SHAPE) and saved["time_s"] > 0
    assert {"count", "percent", "count_in_mask", "percent_in_mask"} <= set(saved["folding"])
    assert set(saved["dice"]["per_label"]) == {"1", "2", "3", "4"}
    assert 0.0 < saved["dice"]["mean"] <= 1.0
    assert saved["resampled"] is False and saved["padding"] is None
    assert saved["normalised"] == {"moving": True, "fixed": False}
    assert any("normalised" in note for note in saved["notes"])

    with open(out / "figure.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    import matplotlib.image

    picture = matplotlib.image.imread(str(out / "figure.png"))
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100


def test_register_accepts_a_model_object_without_labels(pair, tmp_path):
    out = tmp_path / "reg"
    summary = infer.register(perturbed_model(), pair["moving"], pair["fixed"], str(out),
                             figure=False)
    assert summary["dice"] is None and summary["model"]["directory"] is None
    assert "count_in_mask" not in summary["folding"]
    produced = set(os.listdir(out))
    assert produced == set(infer.OUTPUT_FILES) - {"warped_labels.nii.gz", "figure.png"}


def test_resample_to_grid_is_exact_for_a_linear_function():
    # Target grid: 2 mm; source grid: 1.5 mm, shifted, larger. A function linear in world
    # coordinates is reproduced exactly by trilinear resampling away from the border.
    source_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    source_affine[:3, 3] = [-37.0, -40.0, -26.0]
    source_shape = (48, 48, 44)
    world = np.einsum("ij,j...->i...", source_affine[:3, :3],
                      np.indices(source_shape).astype(np.float64)) \
        + source_affine[:3, 3].reshape(3, 1, 1, 1)
    volume = (0.3 * world[0] - 0.2 * world[1] + 0.1 * world[2] + 50.0).astype(np.float32)
    out = infer.resample_to_grid(volume, source_affine, AFFINE, SHAPE, order=1)
    target_world = np.einsum("ij,j...->i...", AFFINE[:3, :3],
                             np.indices(SHAPE).astype(np.float64)) \
        + AFFINE[:3, 3].reshape(3, 1, 1, 1)
    expected = 0.3 * target_world[0] - 0.2 * target_world[1] + 0.1 * target_world[2] + 50.0
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)  # float32 coordinates


def test_register_resamples_a_moving_image_on_another_grid(tmp_path, model_dir):
    fixed, fixed_seg = synthetic_subject(seed=1)
    moving, moving_seg = synthetic_subject(shape=(40, 40, 40), seed=2)
    # The moving grid: 1.6 mm voxels whose world extent covers the fixed image's.
    moving_affine = np.diag([1.6, 1.6, 1.6, 1.0])
    moving_affine[:3, 3] = AFFINE[:3, 3] + (31 * 2.0 - 39 * 1.6) / 2.0
    paths = {"moving_path": save_nifti(tmp_path / "m.nii.gz", moving, moving_affine),
             "moving_labels": save_nifti(tmp_path / "m_seg.nii.gz", moving_seg, moving_affine),
             "fixed_path": save_nifti(tmp_path / "f.nii.gz", fixed),
             "fixed_labels": save_nifti(tmp_path / "f_seg.nii.gz", fixed_seg)}
    out = tmp_path / "reg"
    summary = infer.register(model_dir, out_dir=str(out), figure=False, **paths)
    assert summary["resampled"] is True
    assert any("resampled onto the fixed grid" in note for note in summary["notes"])
    assert summary["moving_shape"] == [40, 40, 40]
    for name in ("warped", "warped_labels", "disp"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert img.shape[:3] == SHAPE
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    # Same anatomy in world space (centred ellipsoids): the resampled labels overlap well.
    assert summary["dice"]["before"] > 0.8


@pytest.mark.parametrize("shape, expect", [((32, 48, 32), "rebuilt"), ((30, 32, 34), "padded")])
def test_register_fits_the_model_to_the_fixed_grid(tmp_path, model_dir, shape, expect):
    fixed, fixed_seg = synthetic_subject(shape=shape, seed=1)
    moving, moving_seg = synthetic_subject(shape=shape, shift=(1.0, 0.0, -1.0), seed=2)
    paths = {"moving_path": save_nifti(tmp_path / "m.nii.gz", moving),
             "fixed_path": save_nifti(tmp_path / "f.nii.gz", fixed)}
    out = tmp_path / "reg"
    summary = infer.register(model_dir, out_dir=str(out), figure=False, **paths)
    assert any(expect in note for note in summary["notes"]), summary["notes"]
    disp = nib.load(str(out / "disp.nii.gz")).get_fdata()
    assert disp.shape == (*shape, 3)
    warped = nib.load(str(out / "warped.nii.gz")).get_fdata()
    assert warped.shape == shape
    # Cropping keeps the field and the warped image aligned (tolerance: float32 round-off).
    np.testing.assert_allclose(warped, pull_back(moving, disp), atol=2e-3)
    if expect == "padded":
        assert summary["padding"] == [[1, 1], [0, 0], [7, 7]]
        assert summary["model"]["input_shape"] == [32, 32, 48]
    else:
        assert summary["padding"] is None and summary["model"]["input_shape"] == list(shape)


def test_corrupt_moving_file_raises_and_writes_nothing(pair, model_dir, tmp_path):
    corrupt = tmp_path / "corrupt_moving.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file" * 10)
    out = tmp_path / "reg"
    with pytest.raises(io.InvalidInputError, match="corrupt_moving.nii.gz"):
        infer.register(model_dir, str(corrupt), pair["fixed"], str(out))
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_outputs(pair, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "reg"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_displacement_itk", broken)
    with pytest.raises(OSError, match="disk full"):
        infer.register(model_dir, pair["moving"], pair["fixed"], str(out), figure=False)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_missing_model_tells_to_pass_model(monkeypatch, pair, tmp_path):
    fv = flags.FlagValues()
    infer.define_flags(fv)
    fv(["infer", "--moving", pair["moving"], "--fixed", pair["fixed"],
        "--out", str(tmp_path / "reg")])
    monkeypatch.setattr(infer, "PRETRAINED_DIR", str(tmp_path / "no_such_model"))
    with pytest.raises(app.UsageError, match="--model"):
        infer.run_from_flags(fv)
    assert not (tmp_path / "reg").exists()


def test_command_line(pair, model_dir, tmp_path):
    out = tmp_path / "cli out"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "mdregnet.infer", "--moving", pair["moving"], "--fixed",
         pair["fixed"], "--model", model_dir, "--out", str(out), "--moving_labels",
         pair["moving_labels"], "--fixed_labels", pair["fixed_labels"], "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(out) in result.stdout and "Dice mean" in result.stdout
    assert set(os.listdir(out)) == set(infer.OUTPUT_FILES)


# ------------------------------------------------------------------------------------------------
# The embedded default pair and --preprocess
# ------------------------------------------------------------------------------------------------
def _flags(argv):
    fv = flags.FlagValues()
    infer.define_flags(fv)
    fv(["infer"] + argv)
    return fv


def test_default_pair_files_are_on_one_grid_in_mni_space():
    pair = assets.default_pair()
    fixed, fixed_img = io.load_image(pair.fixed)
    moving, moving_img = io.load_image(pair.moving)
    labels, labels_img = io.load_labels(pair.moving_labels)
    assert fixed.shape == moving.shape == labels.shape == (80, 112, 80)
    io.check_same_grid(fixed_img, pair.fixed, moving_img, pair.moving)
    io.check_same_grid(fixed_img, pair.fixed, labels_img, pair.moving_labels)
    np.testing.assert_allclose(np.diag(fixed_img.affine)[:3], [2.0, 2.0, 2.0])
    # World (0, 0, 0), the MNI origin near the anterior commissure, lies inside the brain box.
    centre = np.linalg.solve(fixed_img.affine, [0.0, 0.0, 0.0, 1.0])[:3]
    assert np.all(centre > 10) and np.all(centre < np.array(fixed.shape) - 10)
    assert 0.0 <= fixed.min() and fixed.max() <= 1.0 + 1e-6 and moving.max() <= 1.0 + 1e-6
    # Both are brains aligned to each other: high overlap of the brain masks, AAL has 116 regions.
    a, b = fixed > 0, moving > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    assert len(np.unique(labels)) == 117


def test_default_pair_runs_with_a_given_model(model_dir, tmp_path, capsys):
    out = tmp_path / "default"
    summary = infer.run_from_flags(_flags(["--model", model_dir, "--out", str(out),
                                           "--device", "cpu", "--nofigure"]))
    printed = capsys.readouterr().out
    assert "embedded default pair" in printed and str(out) in printed
    assert summary["moving"] == assets.default_pair().moving
    assert summary["shape"] == [80, 112, 80]
    assert "warped_labels.nii.gz" in summary["outputs"]
    assert nib.load(str(out / "warped.nii.gz")).shape == (80, 112, 80)


def test_only_one_of_moving_and_fixed_is_a_usage_error(pair, tmp_path):
    with pytest.raises(app.UsageError, match="both --moving and --fixed"):
        infer.run_from_flags(_flags(["--moving", pair["moving"], "--out", str(tmp_path / "o")]))


def test_preprocess_aligns_both_images_to_the_template_grid(mni_model_dir, tmp_path):
    """A rotated and shifted copy of the default moving image (1.5 mm voxels, another field of
    view, a header that does not know the rotation) goes back onto the template grid with
    --preprocess."""
    pair = assets.default_pair()
    moving, img = io.load_image(pair.moving)
    angle = np.deg2rad(6.0)
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    new_affine = np.eye(4)
    new_affine[:3, :3] = rot @ np.diag([1.5, 1.5, 1.5])
    new_affine[:3, 3] = img.affine[:3, 3] + np.array([-6.0, 4.0, 3.0])
    shape = (112, 150, 112)
    raw = infer.resample_to_grid(moving * 900.0, img.affine, new_affine, shape, order=1)
    # The header does not know the rotation and places the head 8 mm off: world space differs.
    header_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    header_affine[:3, 3] = new_affine[:3, 3] + np.array([8.0, 0.0, 0.0])
    raw_path = save_nifti(tmp_path / "raw_moving.nii.gz", raw.astype(np.float32), header_affine)
    out = tmp_path / "pre"
    summary = infer.run_from_flags(_flags(["--moving", raw_path, "--fixed", pair.fixed,
                                           "--model", mni_model_dir, "--out", str(out),
                                           "--preprocess",
                                           "--device", "cpu", "--nofigure"]))
    assert any("preprocessed" in note for note in summary["notes"])
    warped = nib.load(str(out / "warped.nii.gz"))
    assert warped.shape == (80, 112, 80)
    # The template grid is the default pair's grid (the shipped models' grid).
    np.testing.assert_allclose(warped.affine, img.affine, atol=1e-4)
    # The preprocessed moving image is the original again (up to interpolation): the affine
    # alignment undid the rotation and shift, which resampling through the headers keeps.
    paths, _ = infer.preprocess_pair(raw_path, pair.fixed, str(tmp_path), mni_model_dir)
    recovered = io.load_image(paths["moving"])[0]
    brain = moving > 0
    corr = np.corrcoef(recovered[brain], moving[brain])[0, 1]
    naive = infer.resample_to_grid(raw, header_affine, img.affine, moving.shape, order=1)
    assert corr > 0.95 and corr > np.corrcoef(naive[brain], moving[brain])[0, 1] + 0.05


def test_preprocess_refuses_an_image_with_skull_and_no_mask(model_dir, tmp_path):
    pair = assets.default_pair()
    moving, img = io.load_image(pair.moving)
    skull = save_nifti(tmp_path / "skull.nii.gz", (moving + 0.1).astype(np.float32), img.affine)
    with pytest.raises(io.InvalidInputError, match="skull-stripped"):
        infer.run_from_flags(_flags(["--moving", skull, "--fixed", pair.fixed, "--model",
                                     model_dir, "--out", str(tmp_path / "o"), "--preprocess"]))
    assert not (tmp_path / "o").exists()


def test_readme_command_registers_the_default_pair_with_the_shipped_model(tmp_path):
    """The README's main-job command on a machine with nothing but the package."""
    assert os.path.isfile(os.path.join(infer.PRETRAINED_DIR, "config.json")), \
        "the pretrained model is not shipped in mdregnet/pretrained"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "mdregnet.infer", "--device", "cpu"],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "mdregnet_out"
    assert str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "mdregnet"
    assert summary["folding"]["percent"] < 1.0
    assert set(os.listdir(out)) >= {"warped.nii.gz", "disp_itk.nii.gz", "inverse_disp.nii.gz",
                                    "warped_labels.nii.gz", "figure.png", "summary.json"}
