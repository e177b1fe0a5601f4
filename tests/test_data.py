"""Tests for mdregnet.data: subject discovery, cohort loading, pair sampling, HDF5 cache."""

import os

import nibabel as nib
import numpy as np
import pytest

from mdregnet import data, io

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (4, 5, 6)


def _save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def _image(value, shape=SHAPE):
    """An image in [0, 1] whose voxel (0, 0, 0) encodes `value` (for checking which was loaded)."""
    array = np.full(shape, 0.5, np.float32)
    array[0, 0, 0] = value
    return array


def _make_dataset(root, image_names, label_names=()):
    image_dir, label_dir = root / "images", root / "labels"
    image_dir.mkdir()
    label_dir.mkdir()
    for k, name in enumerate(image_names):
        _save(image_dir / name, _image(k / 10.0))
    for k, name in enumerate(label_names):
        _save(label_dir / name, np.full(SHAPE, k + 1, np.uint8))
    return str(image_dir), str(label_dir)


def _ids(subjects):
    return [s.id for s in subjects]


def _names(subjects):
    return [os.path.basename(s.labels) if s.labels else None for s in subjects]


# ------------------------------------------------------------------------------------------------
# find_subjects
# ------------------------------------------------------------------------------------------------
def test_find_subjects_sorted_with_prefix_matching(tmp_path):
    image_dir, label_dir = _make_dataset(
        tmp_path, ["sub2_T1.nii.gz", "sub10_T1.nii", "sub1_T1.nii.gz"],
        ["sub10_T1_seg.nii.gz", "sub1_T1_seg.nii.gz", "sub2_T1_seg.nii.gz"])
    with open(os.path.join(image_dir, "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(image_dir, ".tmp-abc-sub3_T1.nii.gz"), "w") as f:
        f.write("in-progress write")  # hidden temp files of atomic_write are ignored
    subjects = data.find_subjects(image_dir)
    assert _ids(subjects) == ["sub10_T1", "sub1_T1", "sub2_T1"]  # sorted by file name
    assert all(s.labels is None for s in subjects)
    assert subjects[0].image == os.path.join(image_dir, "sub10_T1.nii")

    subjects = data.find_subjects(image_dir, label_dir)
    # `sub1_T1` must match `sub1_T1_seg`, not `sub10_T1_seg`.
    assert _names(subjects) == ["sub10_T1_seg.nii.gz", "sub1_T1_seg.nii.gz", "sub2_T1_seg.nii.gz"]


def test_find_subjects_exact_name_and_modality_suffix(tmp_path):
    image_dir, label_dir = _make_dataset(tmp_path, ["a.nii.gz", "b_T1.nii.gz"],
                                         ["a.nii.gz", "b_seg.nii.gz"])
    subjects = data.find_subjects(image_dir, label_dir)
    assert _names(subjects) == ["a.nii.gz", "b_seg.nii.gz"]


def test_find_subjects_label_suffix_and_ambiguity(tmp_path):
    image_dir, label_dir = _make_dataset(
        tmp_path, ["s1_T1.nii.gz", "s2_T1.nii.gz"],
        ["s1_T1_aseg.nii.gz", "s1_T1_DLMUSE.nii.gz", "s2_T1_aseg.nii.gz", "s2_T1_DLMUSE.nii.gz"])
    with pytest.raises(io.InvalidInputError, match=r"several label files.*s1_T1.*label_suffix"):
        data.find_subjects(image_dir, label_dir)
    subjects = data.find_subjects(image_dir, label_dir, label_suffix="_DLMUSE")
    assert _names(subjects) == ["s1_T1_DLMUSE.nii.gz", "s2_T1_DLMUSE.nii.gz"]
    subjects = data.find_subjects(image_dir, label_dir, label_suffix="_aseg.nii.gz")
    assert _names(subjects) == ["s1_T1_aseg.nii.gz", "s2_T1_aseg.nii.gz"]


def test_find_subjects_missing_label(tmp_path):
    image_dir, label_dir = _make_dataset(tmp_path, ["a.nii.gz", "b.nii.gz"], ["a_seg.nii.gz"])
    with pytest.raises(io.InvalidInputError, match=r"b\.nii\.gz: no label map for subject 'b'"):
        data.find_subjects(image_dir, label_dir)
    # Only the listed subjects need labels.
    assert _ids(data.find_subjects(image_dir, label_dir, subjects=["a"])) == ["a"]


def test_find_subjects_list_file(tmp_path):
    image_dir, _ = _make_dataset(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    listing = tmp_path / "val.txt"
    listing.write_text("# validation subjects\nc\n\n  a.nii.gz  # with extension\n")
    assert _ids(data.find_subjects(image_dir, subjects=str(listing))) == ["c", "a"]
    assert _ids(data.find_subjects(image_dir, subjects=listing)) == ["c", "a"]  # PathLike
    assert _ids(data.find_subjects(image_dir, subjects=["b", "a"])) == ["b", "a"]

    listing.write_text("a\nzz\n")
    with pytest.raises(io.InvalidInputError, match=rf"^{listing}: unknown subject id 'zz'"):
        data.find_subjects(image_dir, subjects=str(listing))
    with pytest.raises(io.InvalidInputError, match=rf"^{image_dir}: unknown subject id 'q'"):
        data.find_subjects(image_dir, subjects=["q"])
    listing.write_text("a\na\n")
    with pytest.raises(io.InvalidInputError, match="listed twice"):
        data.find_subjects(image_dir, subjects=str(listing))
    listing.write_text("# nothing\n")
    with pytest.raises(io.InvalidInputError, match="empty"):
        data.find_subjects(image_dir, subjects=str(listing))
    with pytest.raises(io.InvalidInputError, match="cannot read"):
        data.find_subjects(image_dir, subjects=str(tmp_path / "missing.txt"))


def test_find_subjects_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(io.InvalidInputError, match=rf"^{tmp_path / 'empty'}: no NIfTI images"):
        data.find_subjects(str(tmp_path / "empty"))
    with pytest.raises(io.InvalidInputError, match="no such directory"):
        data.find_subjects(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# load_cohort
# ------------------------------------------------------------------------------------------------
def test_load_cohort(tmp_path):
    image_dir, label_dir = _make_dataset(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"],
                                         ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    subjects = data.find_subjects(image_dir, label_dir)
    images, labels, ref = data.load_cohort(subjects)
    assert images.shape == (3,) + SHAPE and images.dtype == np.float32 and labels is None
    np.testing.assert_allclose(images[:, 0, 0, 0], [0.0, 0.1, 0.2], atol=1e-7)
    np.testing.assert_allclose(ref.affine, AFFINE)

    images, labels, _ = data.load_cohort(subjects, with_labels=True)
    assert labels.shape == (3,) + SHAPE and labels.dtype == np.int32
    np.testing.assert_array_equal(labels[:, 0, 0, 0], [1, 2, 3])

    with pytest.raises(io.InvalidInputError, match="no label map"):
        data.load_cohort(data.find_subjects(image_dir), with_labels=True)


def test_load_cohort_rejects_unscaled_images(tmp_path):
    image_dir, _ = _make_dataset(tmp_path, ["a.nii.gz"])
    _save(os.path.join(image_dir, "b.nii.gz"), np.full(SHAPE, 255.0, np.float32))
    with pytest.raises(io.InvalidInputError,
                       match=r"b\.nii\.gz: intensities in \[255, 255\].*mdregnet\.preprocess"):
        data.load_cohort(data.find_subjects(image_dir))


def test_load_cohort_grid_mismatch(tmp_path):
    image_dir, label_dir = _make_dataset(tmp_path, ["a.nii.gz"], ["a.nii.gz"])
    shifted = AFFINE.copy()
    shifted[:3, 3] = 10.0
    _save(os.path.join(image_dir, "b.nii.gz"), _image(0.3), shifted)
    subjects = data.find_subjects(image_dir)
    with pytest.raises(io.InvalidInputError, match=r"b\.nii\.gz: not on the same grid as"):
        data.load_cohort(subjects)
    images, _, _ = data.load_cohort(subjects, check_grid=False)  # only shapes must agree
    assert images.shape == (2,) + SHAPE

    _save(os.path.join(image_dir, "b.nii.gz"), _image(0.3, (4, 5, 7)))
    with pytest.raises(io.InvalidInputError, match="4x5x7 vs 4x5x6"):
        data.load_cohort(data.find_subjects(image_dir))

    # A label map on another grid than its image.
    os.remove(os.path.join(image_dir, "b.nii.gz"))
    _save(os.path.join(label_dir, "a.nii.gz"), np.ones(SHAPE, np.uint8), shifted)
    with pytest.raises(io.InvalidInputError, match=r"labels.*a\.nii\.gz: not on the same grid"):
        data.load_cohort(data.find_subjects(image_dir, label_dir), with_labels=True)


def test_load_cohort_invalid_file_is_named(tmp_path):
    image_dir, _ = _make_dataset(tmp_path, ["a.nii.gz"])
    bad = os.path.join(image_dir, "b.nii.gz")
    with open(bad, "wb") as f:
        f.write(b"garbage" * 100)
    with pytest.raises(io.InvalidInputError, match=rf"^{bad}: "):
        data.load_cohort(data.find_subjects(image_dir))


# ------------------------------------------------------------------------------------------------
# all_pairs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
def test_all_pairs(n):
    pairs = data.all_pairs(n)
    assert pairs.shape == (n * n, 2)
    assert {tuple(p) for p in pairs} == {(i, j) for i in range(n) for j in range(n)}
    assert all((i, i) in {tuple(p) for p in pairs} for i in range(n))  # identical pairs included
    np.testing.assert_array_equal(pairs[:2], [[0, 0], [0, 1]][:len(pairs[:2])])
    distinct = data.all_pairs(n, include_identical=False)
    assert distinct.shape == (n * (n - 1), 2) and (distinct[:, 0] != distinct[:, 1]).all()


# ------------------------------------------------------------------------------------------------
# pair_dataset
# ------------------------------------------------------------------------------------------------
def _coded_images(n, spatial=(4, 4, 4)):
    """Images whose every voxel equals their index, so a batch tells which images it holds."""
    return np.arange(n, dtype=np.float32).reshape((n,) + (1,) * len(spatial)) * np.ones(
        (n,) + spatial, np.float32)


def _pairs_of(dataset, batches=None):
    out = []
    for moving, fixed in (dataset if batches is None else dataset.take(batches)):
        m = moving.numpy().reshape(moving.shape[0], -1)
        f = fixed.numpy().reshape(fixed.shape[0], -1)
        assert (m == m[:, :1]).all() and (f == f[:, :1]).all()  # whole volumes, not mixed
        out.extend(zip(m[:, 0].astype(int).tolist(), f[:, 0].astype(int).tolist()))
    return out


def test_pair_dataset_shapes_and_one_epoch(tmp_path):
    images = _coded_images(4)
    ds = data.pair_dataset(images, batch_size=4, seed=3, repeat=False)
    spec = ds.element_spec
    assert spec[0].shape == (4, 4, 4, 4, 1) and spec[0].dtype.name == "float32"
    assert spec[1].shape == (4, 4, 4, 4, 1)
    pairs = _pairs_of(ds)
    assert len(pairs) == 16 and set(pairs) == {(i, j) for i in range(4) for j in range(4)}


def test_pair_dataset_determinism_and_seeds():
    images = _coded_images(5)
    first = _pairs_of(data.pair_dataset(images, batch_size=5, seed=7), batches=10)
    again = _pairs_of(data.pair_dataset(images, batch_size=5, seed=7), batches=10)
    other = _pairs_of(data.pair_dataset(images, batch_size=5, seed=8), batches=10)
    assert first == again
    assert first != other
    # Each epoch (25 pairs) visits every pair once, in a new order.
    assert set(first[:25]) == set(first[25:]) == {(i, j) for i in range(5) for j in range(5)}
    assert first[:25] != first[25:]
    # Re-iterating the same dataset object gives the same sequence.
    ds = data.pair_dataset(images, batch_size=5, seed=7)
    assert _pairs_of(ds, batches=3) == _pairs_of(ds, batches=3) == first[:15]


def test_pair_dataset_start_continues_the_stream():
    """`start=k` yields the stream of the same seed from its k-th batch on, across epochs (25
    pairs each here), without gathering the skipped volumes."""
    images = _coded_images(5)
    whole = _pairs_of(data.pair_dataset(images, batch_size=2, seed=3), batches=20)
    later = _pairs_of(data.pair_dataset(images, batch_size=2, seed=3, start=11), batches=9)
    assert later == whole[22:]
    with pytest.raises(ValueError, match="start must be >= 0"):
        data.pair_dataset(images, start=-1)


def test_pair_dataset_no_shuffle_drop_remainder():
    images = _coded_images(3)
    pairs = _pairs_of(data.pair_dataset(images, batch_size=2, shuffle=False, repeat=False))
    assert pairs == [tuple(p) for p in data.all_pairs(3)[:8].tolist()]  # 9 pairs, last dropped
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.pair_dataset(images, batch_size=10, repeat=False)


def test_pair_dataset_2d():
    images = _coded_images(3, spatial=(6, 8))
    ds = data.pair_dataset(images, batch_size=3, repeat=False)
    assert ds.element_spec[0].shape == (3, 6, 8, 1)
    assert set(_pairs_of(ds)) == {(i, j) for i in range(3) for j in range(3)}


def test_pair_dataset_bad_input():
    with pytest.raises(ValueError, match=r"\(N, X, Y, Z\)"):
        data.pair_dataset(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="batch_size"):
        data.pair_dataset(_coded_images(2), batch_size=0)


# ------------------------------------------------------------------------------------------------
# HDF5 cache
# ------------------------------------------------------------------------------------------------
def test_hdf5_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((3,) + SHAPE).astype(np.float32)
    labels = rng.integers(0, 50, (3,) + SHAPE).astype(np.int32)
    path = str(tmp_path / "cohort.h5")
    data.write_hdf5(path, images, labels, ids=["a", "b", "c"])
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []

    with data.H5Volumes(path) as vols:
        assert len(vols) == 3 and vols.shape == (3,) + SHAPE and vols.ids == ["a", "b", "c"]
        np.testing.assert_array_equal(vols[1], images[1])
        np.testing.assert_array_equal(vols[-1], images[2])
        assert vols[0].dtype == np.float32
        np.testing.assert_array_equal(vols[[2, 0]], images[[2, 0]])
        np.testing.assert_array_equal(np.asarray(vols), images)
        with pytest.raises(IndexError):
            vols[3]
    lab = data.H5Volumes(path, "labels")
    assert lab[2].dtype == np.int32
    np.testing.assert_array_equal(lab[2], labels[2])
    lab.close()

    with pytest.raises(io.InvalidInputError, match="no dataset 'flows'"):
        data.H5Volumes(path, "flows")
    with pytest.raises(io.InvalidInputError, match="no such file"):
        data.H5Volumes(str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        data.write_hdf5(path, images, ids=["a", "b"])
    with pytest.raises(ValueError, match="labels shape"):
        data.write_hdf5(path, images, labels[:2])


def test_h5volumes_with_pair_dataset(tmp_path):
    images = _coded_images(3)
    path = str(tmp_path / "cohort.h5")
    data.write_hdf5(path, images)
    vols = data.H5Volumes(path)
    from_h5 = _pairs_of(data.pair_dataset(vols, batch_size=3, seed=5), batches=6)
    from_np = _pairs_of(data.pair_dataset(images, batch_size=3, seed=5), batches=6)
    assert from_h5 == from_np
    assert set(from_h5[:9]) == {(i, j) for i in range(3) for j in range(3)}
    vols.close()
