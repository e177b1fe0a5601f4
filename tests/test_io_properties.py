"""Property-based tests (hypothesis) of mdregnet.io's NIfTI reading and validation.

The contract under test: whatever the file holds, `io.load_volume` (and `load_image`,
`load_labels`) either returns a valid array of the announced shape and type, or raises an
`io.InvalidInputError` whose one-line message starts with the file's path; never another
exception type. `io.check_same_grid` either passes or raises an `InvalidInputError` naming a file.

Examples are tiny volumes (at most 6 voxels a side) and few (30-50 per property) so the file runs
in seconds; each property also checks the outcome against an oracle written independently here,
so a loader that refused everything (or accepted everything) fails.
"""

import gzip
import os
import tempfile

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mdregnet import io

# database=None: no .hypothesis/ folder in the working tree.
SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]
#: Voxel sizes drawn for each axis of an affine: 0, NaN and Inf make it unusable.
ZOOMS = [-2.0, -1.0, 0.5, 1.0, 1.5, 2.0, 0.0, float("nan"), float("inf")]


def _expect_invalid(path, call):
    """Runs `call()`; returns None if it raised an InvalidInputError naming `path` in one line,
    else its result. Any other exception propagates (and fails the property)."""
    try:
        return call()
    except io.InvalidInputError as err:
        message = str(err)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message, message
        return None


def _save(path, array, affine):
    """Writes `array` with `affine` as the sform (qform unset), whatever the affine holds."""
    header = nib.Nifti1Header()
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(array, None, header=header), path)  # affine None: header kept


@st.composite
def volumes(draw):
    """`(kind, array, affine)`: any shape of 1 to 5 axes (sizes 1 to 6), a NIfTI dtype, values
    with NaN/Inf sprinkled into float data, and an affine that may be degenerate or non-finite."""
    kind = draw(st.sampled_from(io.KINDS))
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    if kind == "field" and draw(st.booleans()):  # a well-formed field now and then
        shape = shape[:3] + (1,) * (3 - len(shape[:3])) + (3,)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    if dtype.kind == "f":
        elements = st.one_of(st.integers(-5, 5).map(float),
                             st.floats(-1e6, 1e6, allow_nan=False, width=32),
                             st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        fill = st.one_of(st.just(0.0), st.floats(-1e6, 1e6, allow_nan=False, width=32))
    else:
        elements = st.integers(0, 100)
        fill = st.sampled_from([0, 1, 7])
    array = draw(hnp.arrays(dtype, shape, elements=elements, fill=fill))
    zooms = draw(st.lists(st.sampled_from(ZOOMS), min_size=3, max_size=3))
    affine = np.diag(zooms + [1.0])
    affine[:3, 3] = draw(st.lists(st.floats(-100, 100), min_size=3, max_size=3))
    return kind, array, affine


def _oracle(kind, array, affine):
    """The problem `load_volume` must report (a regex of its message), or None if valid."""
    shape = array.shape
    squeezed = shape
    while squeezed and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    if kind == "field":
        if not ((len(shape) == 4 and shape[3] == 3)
                or (len(shape) == 5 and shape[3:] == (1, 3))):
            return "displacement field must have shape"
    elif len(squeezed) != 3:
        return r"\b[0-9]D\b|single value"
    if not np.isfinite(affine).all():
        return "NaN or Inf entries"
    if (np.diag(affine)[:3] == 0).any():
        return "degenerate affine"
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        return "NaN or Inf"
    if kind == "image" and not values.any():
        return "all zero"
    if kind == "labels" and (np.round(values) != values).any():
        return "integers"
    return None


@SETTINGS
@given(volumes())
def test_load_volume_returns_a_valid_array_or_names_the_problem(case):
    kind, array, affine = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vol.nii.gz")
        _save(path, array, affine)
        problem = _oracle(kind, array, affine)
        if problem is None:
            out, img = io.load_volume(path, kind=kind)
            grid = array.shape[:3]
            if kind == "field":
                assert out.shape == grid + (3,) and out.dtype == np.float32
                np.testing.assert_array_equal(out, array.astype(np.float32).reshape(out.shape))
            else:
                assert out.shape == grid and len(out.shape) == 3
                assert out.dtype == (np.int32 if kind == "labels" else np.float32)
                np.testing.assert_array_equal(out, array.reshape(grid).astype(out.dtype))
            # The sform is stored as float32 on disk.
            np.testing.assert_allclose(img.affine, affine, rtol=1e-6, atol=1e-5)
        else:
            with pytest.raises(io.InvalidInputError, match=problem) as info:
                io.load_volume(path, kind=kind)
            message = str(info.value)
            assert message.startswith(f"{path}: ") and "\n" not in message, message


@SETTINGS
@given(volumes())
def test_load_image_and_load_labels_agree_with_load_volume(case):
    _, array, affine = case
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vol.nii")
        _save(path, array, affine)
        for kind, loader in (("image", io.load_image), ("labels", io.load_labels)):
            problem = _oracle(kind, array, affine)
            out = _expect_invalid(path, lambda loader=loader: loader(path)[0])
            assert (out is None) == (problem is not None), (kind, problem)


@st.composite
def gz_files(draw):
    """The bytes of a valid .nii.gz of a random small float32 volume, and the volume."""
    shape = tuple(draw(st.lists(st.integers(2, 6), min_size=3, max_size=3)))
    array = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.125, 1.0, width=32)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.nii.gz")
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), path)
        with open(path, "rb") as f:
            return f.read(), array


@SETTINGS
@given(gz_files(), st.data())
def test_any_truncation_of_a_nii_gz_is_refused_naming_the_file(case, data):
    raw, array = case
    keep = data.draw(st.integers(0, len(raw) - 1), label="bytes kept")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cut.nii.gz")
        with open(path, "wb") as f:
            f.write(raw[:keep])
        with pytest.raises(io.InvalidInputError) as info:
            io.load_image(path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert "truncated" in message or "corrupt" in message or "not a readable" in message


@SETTINGS
@given(gz_files(), st.data())
def test_a_flipped_byte_is_refused_or_harmless(case, data):
    raw, array = case
    where = data.draw(st.integers(0, len(raw) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(raw)
    bad[where] ^= flip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "flipped.nii.gz")
        with open(path, "wb") as f:
            f.write(bytes(bad))
        out = _expect_invalid(path, lambda: io.load_image(path)[0])
    if out is not None:  # e.g. the gzip header's time stamp, or deflate bits that decode alike
        np.testing.assert_array_equal(out, array)


@st.composite
def fuzzed_headers(draw):
    """An uncompressed .nii (6x5x4 int16) whose 348-byte header has 1 to 8 random bytes
    replaced, so dims, dtype, offset, scaling, qform and sform take arbitrary values."""
    array = np.arange(1, 121, dtype=np.int16).reshape(6, 5, 4)
    img = nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = bytearray(img.header.binaryblock + b"\0" * 4 + array.tobytes(order="F"))
    edits = draw(st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), min_size=1,
                          max_size=8))
    for where, value in edits:
        raw[where] = value
    return bytes(raw)


@settings(SETTINGS, max_examples=50)
@given(fuzzed_headers(), st.sampled_from(io.KINDS))
def test_fuzzed_header_never_raises_another_exception_type(raw, kind):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz.nii")
        with open(path, "wb") as f:
            f.write(raw)
        out = _expect_invalid(path, lambda: io.load_volume(path, kind=kind,
                                                           max_voxels=10_000)[0])
    if out is not None:
        assert out.dtype == (np.int32 if kind == "labels" else np.float32)
        assert out.ndim == (4 if kind == "field" else 3)
        assert np.isfinite(out).all()


@st.composite
def grids(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=3, max_size=3)))
    zooms = draw(st.lists(st.sampled_from(ZOOMS), min_size=3, max_size=3))
    affine = np.diag(zooms + [1.0])
    affine[:3, 3] = draw(st.lists(st.floats(-10, 10), min_size=3, max_size=3))
    if draw(st.booleans()):  # an oblique grid: a rotation about axis 2
        angle = draw(st.floats(-3.2, 3.2))
        rotation = np.eye(4)
        rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
        with np.errstate(invalid="ignore"):  # NaN/Inf zooms stay NaN/Inf
            affine = rotation @ affine
    return shape, affine


@SETTINGS
@given(grids(), grids(), st.booleans())
def test_check_same_grid_passes_or_names_a_file(a, b, same):
    if same:
        b = a
    (shape_a, aff_a), (shape_b, aff_b) = a, b
    with tempfile.TemporaryDirectory() as tmp:  # real files: any sform, as a foreign tool wrote
        path_a, path_b = os.path.join(tmp, "a.nii"), os.path.join(tmp, "b.nii")
        _save(path_a, np.zeros(shape_a, np.float32), aff_a)
        _save(path_b, np.zeros(shape_b, np.float32), aff_b)
        img_a, img_b = nib.load(path_a), nib.load(path_b)
        try:
            io.check_same_grid(img_a, path_a, img_b, path_b)
            passed = True
        except io.InvalidInputError as err:
            message = str(err)
            assert message.startswith((f"{path_a}: ", f"{path_b}: ")), message
            assert "\n" not in message, message
            passed = False
    finite = np.isfinite(aff_a).all() and np.isfinite(aff_b).all()
    expected = bool(shape_a == shape_b and finite
                    and np.allclose(aff_a, aff_b, rtol=0.0, atol=1e-3))
    assert passed == expected


def test_gzip_trailer_loss_is_refused(tmp_path):
    """The regression the truncation property found: cutting only the gzip trailer (CRC and
    length, the last 8 bytes) leaves every voxel readable, yet the file is corrupt."""
    path = str(tmp_path / "v.nii.gz")
    volume = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    raw = open(path, "rb").read()
    cut = str(tmp_path / "no_trailer.nii.gz")
    with open(cut, "wb") as f:
        f.write(raw[:-4])
    with gzip.open(cut) as f:  # every voxel is still there
        assert len(f.read(352 + volume.nbytes)) == 352 + volume.nbytes
    with pytest.raises(io.InvalidInputError, match=r"no_trailer\.nii\.gz: truncated or corrupt"):
        io.load_image(cut)
