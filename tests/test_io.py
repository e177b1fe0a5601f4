"""Tests for mdregnet.io: validated NIfTI reading, atomic writing, scaling, the ITK export."""

import errno
import glob
import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import shared_path
from mdregnet import io

AFFINE_2MM = np.diag([2.0, 2.0, 2.0, 1.0])


def _write(path, array, affine=AFFINE_2MM, dtype=None):
    img = nib.Nifti1Image(np.asarray(array), affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return str(path)


def _volume(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _assert_invalid(path, match, **kw):
    """load_volume(path) raises InvalidInputError whose message starts with the path."""
    with pytest.raises(io.InvalidInputError, match=match) as info:
        io.load_volume(path, **kw)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# load_volume: good inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_load_image_round_trip(tmp_path, ext):
    array = _volume()
    path = _write(tmp_path / f"img{ext}", array)
    out, img = io.load_image(path)
    assert out.dtype == np.float32 and out.shape == (6, 7, 8)
    np.testing.assert_array_equal(out, array)
    np.testing.assert_allclose(img.affine, AFFINE_2MM)


def test_load_image_applies_scaling_and_squeezes_trailing_axes(tmp_path):
    img = nib.Nifti1Image(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1), AFFINE_2MM)
    img.header.set_slope_inter(0.5, 1.0)
    path = str(tmp_path / "scaled.nii.gz")
    nib.save(img, path)
    out, _ = io.load_image(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.arange(24).reshape(2, 3, 4) * 0.5 + 1.0)


def test_load_labels_int32(tmp_path):
    labels = np.random.default_rng(1).integers(0, 40, (5, 6, 7))
    path = _write(tmp_path / "lab.nii.gz", labels.astype(np.float32))  # integer-valued floats
    out, _ = io.load_labels(path)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, labels)
    path = _write(tmp_path / "lab8.nii.gz", labels.astype(np.uint8))
    np.testing.assert_array_equal(io.load_labels(path)[0], labels)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (4, 5, 6, 1, 3)])
def test_load_field(tmp_path, shape):
    field = _volume(shape)
    path = _write(tmp_path / "field.nii.gz", field)
    out, _ = io.load_volume(path, kind="field")
    assert out.shape == (4, 5, 6, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, field.reshape(4, 5, 6, 3))


# ------------------------------------------------------------------------------------------------
# load_volume: every bad input gives a one-line InvalidInputError naming the file
# ------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.nii.gz")
    _assert_invalid(path, "no such file")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers catching that
        io.load_image(path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_nii_gz(tmp_path, keep):
    path = _write(tmp_path / "full.nii.gz", _volume((20, 20, 20)))
    raw = open(path, "rb").read()
    cut = str(tmp_path / "cut.nii.gz")
    with open(cut, "wb") as f:
        f.write(raw[:int(len(raw) * keep)])
    _assert_invalid(cut, "truncated or corrupt")


def test_truncated_header(tmp_path):
    path = _write(tmp_path / "full.nii.gz", _volume())
    with gzip.open(path) as f:
        head = f.read(100)  # less than the 348-byte header
    cut = str(tmp_path / "head.nii.gz")
    with gzip.open(cut, "wb") as f:
        f.write(head)
    _assert_invalid(cut, "not a readable NIfTI")


def test_truncated_uncompressed(tmp_path):
    path = _write(tmp_path / "full.nii", _volume((20, 20, 20)))
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])
    _assert_invalid(path, "truncated or corrupt")


def test_random_bytes(tmp_path):
    path = str(tmp_path / "random.nii.gz")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4000))
    _assert_invalid(path, "not a readable NIfTI")


def test_text_file(tmp_path):
    path = str(tmp_path / "notes.txt")
    with open(path, "w") as f:
        f.write("not an image\n")
    _assert_invalid(path, "not a NIfTI file")


def test_directory(tmp_path):
    _assert_invalid(str(tmp_path), "directory")


def test_other_image_format(tmp_path):
    path = str(tmp_path / "img.mgz")
    nib.save(nib.MGHImage(_volume(), AFFINE_2MM), path)
    _assert_invalid(path, "not a NIfTI file.*MGHImage")


def test_2d_image(tmp_path):
    path = _write(tmp_path / "slice.nii.gz", _volume((6, 7)))
    message = _assert_invalid(path, "2D")
    assert "6x7" in message


def test_2d_slice_with_singleton_axis(tmp_path):
    path = _write(tmp_path / "slice.nii.gz", _volume((6, 7, 1)))
    _assert_invalid(path, r"2D \(shape 6x7x1\)")


def test_4d_image(tmp_path):
    path = _write(tmp_path / "series.nii.gz", _volume((6, 7, 8, 2)))
    _assert_invalid(path, r"4D \(shape 6x7x8x2\)")
    _assert_invalid(path, "4D", kind="labels")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["image", "field", "labels"])
def test_non_finite_voxel(tmp_path, bad, kind):
    shape = (4, 5, 6, 3) if kind == "field" else (4, 5, 6)
    array = np.ones(shape, np.float32)
    array[1, 2, 3] = bad
    path = _write(tmp_path / "bad.nii.gz", array)
    message = _assert_invalid(path, "NaN or Inf", kind=kind)
    assert "(1, 2, 3" in message


def test_all_zero_image(tmp_path):
    path = _write(tmp_path / "zero.nii.gz", np.zeros((4, 5, 6), np.float32))
    _assert_invalid(path, "all zero")
    labels, _ = io.load_labels(path)  # an empty label map is a valid label map
    assert labels.dtype == np.int32 and not labels.any()


def test_float_labels(tmp_path):
    array = np.zeros((4, 5, 6), np.float32)
    array[2, 2, 2] = 1.5
    path = _write(tmp_path / "labels.nii.gz", array)
    message = _assert_invalid(path, "integers", kind="labels")
    assert "(2, 2, 2)" in message and "1.5" in message


def test_bad_field_shape(tmp_path):
    path = _write(tmp_path / "field.nii.gz", _volume((4, 5, 6, 2)))
    _assert_invalid(path, r"\(X, Y, Z, 3\).*4x5x6x2", kind="field")


def test_bad_kind(tmp_path):
    path = _write(tmp_path / "img.nii.gz", _volume())
    with pytest.raises(ValueError, match="kind"):
        io.load_volume(path, kind="mask")


def test_huge_dims_refused_from_header_alone(tmp_path):
    # A header announcing 2000^3 voxels and no data: refused from the header, never read.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.uint8)
    hdr["vox_offset"] = 352
    path = str(tmp_path / "huge.nii")
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * 4)
    message = _assert_invalid(path, "max_voxels")
    assert "2000x2000x2000" in message and "truncated" not in message


def test_max_voxels_limit(tmp_path):
    path = _write(tmp_path / "img.nii.gz", _volume((6, 7, 8)))
    _assert_invalid(path, "336 voxels.*max_voxels=100", max_voxels=100)
    assert io.load_image(path, max_voxels=336)[0].shape == (6, 7, 8)


# ------------------------------------------------------------------------------------------------
# check_same_grid
# ------------------------------------------------------------------------------------------------
def test_check_same_grid(tmp_path):
    a = nib.load(_write(tmp_path / "a.nii.gz", _volume()))
    b = nib.load(_write(tmp_path / "b.nii.gz", _volume(seed=1)))
    io.check_same_grid(a, "a.nii.gz", b, "b.nii.gz")  # no error

    other_shape = nib.Nifti1Image(_volume((6, 7, 9)), AFFINE_2MM)
    with pytest.raises(io.InvalidInputError, match=r"^c\.nii\.gz: .*a\.nii\.gz.*6x7x9 vs 6x7x8"):
        io.check_same_grid(a, "a.nii.gz", other_shape, "c.nii.gz")

    spacing = nib.Nifti1Image(_volume(), np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(io.InvalidInputError, match=r"^d\.nii\.gz: .*a\.nii\.gz.*voxel size"):
        io.check_same_grid(a, "a.nii.gz", spacing, "d.nii.gz")

    flipped = nib.Nifti1Image(_volume(), np.diag([-2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(io.InvalidInputError, match="orientation LAS vs RAS"):
        io.check_same_grid(a, "a.nii.gz", flipped, "e.nii.gz")

    shifted_affine = AFFINE_2MM.copy()
    shifted_affine[:3, 3] = [0.0, 5.0, 0.0]
    shifted = nib.Nifti1Image(_volume(), shifted_affine)
    with pytest.raises(io.InvalidInputError, match="origin"):
        io.check_same_grid(a, "a.nii.gz", shifted, "f.nii.gz")

    tiny = AFFINE_2MM.copy()
    tiny[0, 3] = 1e-4  # below atol: the same grid
    io.check_same_grid(a, "a.nii.gz", nib.Nifti1Image(_volume(), tiny), "g.nii.gz")


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp-")]


def test_save_volume_round_trip_keeps_header(tmp_path):
    src = nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.diag([-2.0, 2.0, 2.0, 1.0]))
    src.header["descrip"] = b"fixed image"
    src.header.set_xyzt_units("mm", "sec")
    src.header.set_slope_inter(2.0, 0.0)
    field = _volume((4, 5, 6, 3))
    path = str(tmp_path / "disp.nii.gz")
    io.save_volume(path, field, src.affine, src.header, dtype=np.float32)
    out = nib.load(path)
    assert out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(out.dataobj), field)  # no scaling carried over
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"fixed image"
    assert src.header.get_data_dtype() == np.uint8  # the given header is not modified
    assert _leftovers(tmp_path) == []
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_save_volume_dtypes(tmp_path):
    path = str(tmp_path / "lab.nii.gz")
    io.save_volume(path, np.arange(24, dtype=np.int64).reshape(2, 3, 4), AFFINE_2MM)
    assert nib.load(path).get_data_dtype() == np.int32
    io.save_volume(path, np.full((2, 3, 4), 2.6), AFFINE_2MM, dtype=np.uint8)
    out = nib.load(path)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(out.dataobj), 3)  # rounded, not scaled
    with pytest.raises(ValueError, match="do not fit"):
        io.save_volume(path, np.full((2, 3, 4), 300), AFFINE_2MM, dtype=np.uint8)


def test_atomic_write_failure_keeps_existing_file(tmp_path):
    path = str(tmp_path / "out.nii.gz")
    _write(path, np.ones((3, 3, 3), np.float32))
    before = open(path, "rb").read()

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left") as info:
        io.atomic_write(path, half_then_fail)
    assert str(info.value).find(path) >= 0 and info.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == before
    assert _leftovers(tmp_path) == []


def test_save_volume_failure_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "out.nii.gz")
    io.save_volume(path, np.ones((3, 3, 3), np.float32), AFFINE_2MM)
    before = open(path, "rb").read()

    def failing_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(io, "_write_nifti", failing_save)
    with pytest.raises(RuntimeError, match="disk went away") as info:
        io.save_volume(path, np.zeros((3, 3, 3), np.float32), AFFINE_2MM)
    assert str(info.value).startswith(path)
    assert open(path, "rb").read() == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_save_volume_writes_standard_nifti(tmp_path, name):
    """The fast gzip writer (ISA-L) gives a standard gzip stream: Python's gzip and nibabel read
    back the exact values, dtype, affine and header units; `.nii` stays uncompressed."""
    rng = np.random.default_rng(3)
    disp = rng.standard_normal((9, 8, 7, 3)).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    path = str(tmp_path / name)
    io.save_volume(path, disp, AFFINE_2MM, header, dtype=np.float32)
    raw = open(path, "rb").read()
    if name.endswith(".gz"):
        assert raw[:2] == b"\x1f\x8b"
        raw = gzip.decompress(raw)
    assert raw[344:348] == b"n+1\x00"  # single-file NIfTI-1 magic
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), disp)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, AFFINE_2MM)
    assert img.header.get_xyzt_units() == ("mm", "sec")


def test_save_into_missing_folder(tmp_path):
    path = str(tmp_path / "missing" / "out.nii.gz")
    with pytest.raises(OSError) as info:
        io.save_volume(path, np.ones((3, 3, 3), np.float32), AFFINE_2MM)
    assert path in str(info.value)


def test_unwritable_directory_chmod(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(str(folder), os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes "
                        "(test_unwritable_directory_monkeypatched covers the failure path)")
        path = str(folder / "out.nii.gz")
        with pytest.raises(PermissionError) as info:
            io.save_volume(path, np.ones((3, 3, 3), np.float32), AFFINE_2MM)
        assert path in str(info.value)
    finally:
        folder.chmod(0o700)


def test_unwritable_directory_monkeypatched(tmp_path, monkeypatch):
    # Root ignores directory permissions, so simulate EACCES where the temp file is created.
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", denied)
    path = str(tmp_path / "out.nii.gz")
    with pytest.raises(PermissionError) as info:  # OSError subclass kept via errno
        io.save_volume(path, np.ones((3, 3, 3), np.float32), AFFINE_2MM)
    assert str(info.value).find(f"{path}: cannot write (Permission denied)") >= 0
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------------------------
# ITK export
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine, expected", [
    (np.diag([2.0, 2.0, 2.0, 1.0]), [-2.0, 0.0, 0.0]),    # RAS: +2 mm R -> -2 mm L in LPS
    (np.diag([-2.0, 2.0, 2.0, 1.0]), [2.0, 0.0, 0.0]),    # LAS: axis 0 points left
    # PSR (IXI): axis 0 -> posterior, axis 1 -> superior, axis 2 -> right
    (np.array([[0.0, 0.0, 2.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]]),
     [0.0, 2.0, 0.0]),
])
def test_itk_export_one_voxel_axis0(tmp_path, affine, expected):
    disp = np.zeros((4, 5, 6, 3), np.float32)
    disp[..., 0] = 1.0  # +1 voxel along array axis 0
    path = str(tmp_path / "disp_itk.nii.gz")
    io.save_displacement_itk(path, disp, affine)
    out = nib.load(path)
    assert out.shape == (4, 5, 6, 1, 3)
    assert out.get_data_dtype() == np.float32
    assert int(out.header["intent_code"]) == 1007
    assert out.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(out.affine, affine)
    data = np.asarray(out.dataobj)
    np.testing.assert_allclose(data[1, 2, 3, 0], expected, atol=1e-6)
    np.testing.assert_allclose(data.reshape(-1, 3), np.tile(expected, (4 * 5 * 6, 1)), atol=1e-6)
    assert _leftovers(tmp_path) == []
    field, _ = io.load_volume(path, kind="field")  # readable back as a field
    assert field.shape == (4, 5, 6, 3)


def test_itk_export_general_vector_and_header(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3))
    affine[:3, 3] = [10.0, -4.0, 3.0]
    disp = rng.normal(size=(3, 4, 5, 3)).astype(np.float32)
    hdr = nib.Nifti1Image(np.zeros((3, 4, 5), np.uint8), affine).header
    path = str(tmp_path / "d.nii.gz")
    io.save_displacement_itk(path, disp[None], affine, hdr)  # batch axis of 1 accepted
    data = np.asarray(nib.load(path).dataobj)[:, :, :, 0, :]
    expected = np.einsum("ij,xyzj->xyzi", affine[:3, :3], disp) * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-5)  # float32 round-off
    assert hdr.get_data_dtype() == np.uint8 and int(hdr["intent_code"]) == 0  # untouched
    with pytest.raises(ValueError, match=r"\(X, Y, Z, 3\)"):
        io.save_displacement_itk(path, disp[..., :2], affine)


# ------------------------------------------------------------------------------------------------
# normalize_intensity
# ------------------------------------------------------------------------------------------------
def test_normalize_intensity_range_and_robustness():
    rng = np.random.default_rng(0)
    array = rng.normal(100.0, 10.0, (20, 20, 20)).astype(np.float32)
    array[0, 0, 0] = 1e6  # an outlier does not set the scale
    out = io.normalize_intensity(array)
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < np.median(out) < 0.6
    lo, hi = np.percentile(array, [0.5, 99.5])
    inside = (array > lo) & (array < hi)
    np.testing.assert_allclose(out[inside], (array[inside] - lo) / (hi - lo), atol=1e-5)


def test_normalize_intensity_mask():
    array = np.zeros((10, 10, 10), np.float32)
    array[2:8, 2:8, 2:8] = np.linspace(50, 150, 216).reshape(6, 6, 6)
    mask = array > 0
    out = io.normalize_intensity(array, mask=mask, lower=0.0, upper=100.0)
    assert out[2, 2, 2] == 0.0 and out[7, 7, 7] == 1.0
    assert (out[~mask] == 0.0).all()  # background below the brain's minimum, clipped to 0
    with pytest.raises(ValueError, match="empty"):
        io.normalize_intensity(array, mask=np.zeros_like(mask))


def test_normalize_intensity_constant():
    out = io.normalize_intensity(np.full((3, 3, 3), 7.0))
    assert out.dtype == np.float32 and (out == 0.0).all()


# ------------------------------------------------------------------------------------------------
# Real data smoke test
# ------------------------------------------------------------------------------------------------
def test_real_ixi_label_maps():
    folder = shared_path("ixi", "labels")
    paths = sorted(glob.glob(os.path.join(folder, "*.nii.gz")))[:2]
    if len(paths) < 2:
        pytest.skip(f"fewer than two IXI label maps in {folder}")
    imgs = []
    for path in paths:
        labels, img = io.load_labels(path)
        assert labels.dtype == np.int32 and labels.ndim == 3
        assert labels.shape == (120, 120, 90)
        assert labels.min() == 0 and 100 < len(np.unique(labels)) < 160
        imgs.append(img)
    # Same shape and 2 mm spacing, but raw IXI volumes differ in their origins (scanner position),
    # so they are not on one grid until preprocessing resamples them to a common space.
    np.testing.assert_allclose(nib.affines.voxel_sizes(imgs[0].affine), 2.0, atol=1e-3)
    np.testing.assert_allclose(nib.affines.voxel_sizes(imgs[1].affine), 2.0, atol=1e-3)
    if not np.allclose(imgs[0].affine, imgs[1].affine, atol=1e-3):
        with pytest.raises(io.InvalidInputError, match="origin"):
            io.check_same_grid(imgs[0], paths[0], imgs[1], paths[1])
