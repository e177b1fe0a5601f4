"""Datasets: finding subjects on disk, loading a cohort, sampling image pairs, tf.data pipelines.

The data flow of training:

    find_subjects(dir)  ->  [Subject(id, image, labels)]
    load_cohort(subjects)  ->  images (N, X, Y, Z) float32 in [0, 1], labels (N, X, Y, Z) int32
    write_hdf5 / H5Volumes  (optional cache, read lazily volume by volume)
    pair_dataset(images)  ->  tf.data of (moving, fixed), each (B, X, Y, Z, 1) float32

Pairs are the n^2 ordered (moving, fixed) pairs of the cohort, identical pairs included, as in the
MDReg-Net paper's training protocol; `pair_dataset` shuffles them per epoch, deterministically for
a seed.
"""

import dataclasses
import os
import threading
from typing import Optional

import numpy as np

from mdregnet import io

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
# Modality suffixes tried (after the plain id) when matching a label file to an image id,
# e.g. image `sub1_T1.nii.gz` with labels `sub1_seg.nii.gz`.
_IMAGE_SUFFIXES = ("_T1w", "_T1", "_T2w", "_T2", "_norm", "_brain", "_image", "_img")
_RANGE_TOL = 1e-3  # accepted excess over [0, 1] (float round-off of a previous scaling)


@dataclasses.dataclass
class Subject:
    """One subject on disk.

    Attributes:
        id: file name of the image without its `.nii` / `.nii.gz` extension.
        image: path of the image.
        labels: path of its label map, or None.
    """

    id: str
    image: str
    labels: Optional[str] = None


def _strip_ext(name):
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def _nifti_files(folder):
    """`{id: path}` of the visible `.nii` / `.nii.gz` files in `folder`, in sorted order."""
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(NIFTI_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, n)))
    files = {}
    for name in names:
        files.setdefault(_strip_ext(name), os.path.join(folder, name))
    return files


def _read_id_list(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise io.InvalidInputError(f"{path}: cannot read the subject list "
                                   f"({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise io.InvalidInputError(f"{path}: not a text file of subject ids (not UTF-8: "
                                   f"{err.reason} at byte {err.start})") from None
    ids = [_strip_ext(os.path.basename(line.split("#", 1)[0].strip())) for line in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise io.InvalidInputError(f"{path}: the subject list is empty")
    return ids


def _match_label(subject_id, label_files, label_dir, label_suffix):
    """Path of the label file of `subject_id` (see `find_subjects`), or None."""
    if label_suffix is not None:
        wanted = _strip_ext(subject_id + label_suffix)
        return label_files.get(wanted)
    if subject_id in label_files:
        return label_files[subject_id]
    stems = [subject_id] + [subject_id[:-len(s)] for s in _IMAGE_SUFFIXES
                            if subject_id.endswith(s) and len(subject_id) > len(s)]
    for stem in stems:
        found = [lid for lid in label_files
                 if lid.startswith(stem) and len(lid) > len(stem) and not lid[len(stem)].isalnum()]
        if len(found) == 1:
            return label_files[found[0]]
        if len(found) > 1:
            raise io.InvalidInputError(
                f"{label_dir}: several label files match subject '{subject_id}' "
                f"({', '.join(sorted(found))}); pass label_suffix to choose")
    return None


def find_subjects(image_dir, label_dir=None, subjects=None, label_suffix=None):
    """Lists the subjects of a data folder, with their label maps.

    Images are the `*.nii` / `*.nii.gz` files of `image_dir` (hidden files, such as the temporary
    files of `io.atomic_write`, are ignored), sorted by name; a subject's id is its file name
    without the extension. Its label file in `label_dir` is, in this order: `id + label_suffix`
    when `label_suffix` is given (e.g. "_DLMUSE" for IXI's `<ID>_T1_DLMUSE.nii.gz`); else the file
    named exactly `id`; else the one whose name starts with `id` followed by a non-alphanumeric
    character (`sub1` matches `sub1_seg`, never `sub10_seg`); else the same with a modality suffix
    such as `_T1` removed from the id (`sub1_T1` matches `sub1_seg`).

    Args:
        image_dir: folder of images.
        label_dir: optional folder of label maps; when given, every selected subject must have one.
        subjects: None (all images), a list of ids, or the path of a text file with one id per
            line (blank lines and `#` comments ignored). Only those subjects are returned, in that
            order. Ids may carry the `.nii.gz` extension.
        label_suffix: optional exact suffix of the label file names after the id (with or without
            the extension).

    Returns:
        list of `Subject`, `labels` None when `label_dir` is None.

    Raises:
        InvalidInputError: `image_dir` (or `label_dir`) missing or without NIfTI files; an unknown
            or repeated id (the message starts with the list file, or `image_dir` for a list);
            a subject without (or with several candidate) label files.
    """
    image_dir = os.fspath(image_dir)
    if not os.path.isdir(image_dir):
        raise io.MissingFileError(f"{image_dir}: no such directory")
    images = _nifti_files(image_dir)
    if not images:
        raise io.InvalidInputError(f"{image_dir}: no NIfTI images (*.nii, *.nii.gz) found")

    if subjects is None:
        ids = list(images)
    else:
        if isinstance(subjects, (str, os.PathLike)):
            source = os.fspath(subjects)
            ids = _read_id_list(source)
        else:
            source = image_dir
            ids = [_strip_ext(os.path.basename(str(s).strip())) for s in subjects]
            if not ids:
                raise io.InvalidInputError(f"{image_dir}: the list of subjects is empty")
        seen = set()
        for subject_id in ids:
            if subject_id not in images:
                raise io.InvalidInputError(f"{source}: unknown subject id '{subject_id}' (no such "
                                           f"image in {image_dir})")
            if subject_id in seen:
                raise io.InvalidInputError(f"{source}: subject id '{subject_id}' is listed twice")
            seen.add(subject_id)

    label_files = None
    if label_dir is not None:
        label_dir = os.fspath(label_dir)
        if not os.path.isdir(label_dir):
            raise io.MissingFileError(f"{label_dir}: no such directory")
        label_files = _nifti_files(label_dir)
        if not label_files:
            raise io.InvalidInputError(f"{label_dir}: no NIfTI label maps (*.nii, *.nii.gz) found")

    out = []
    for subject_id in ids:
        labels = None
        if label_files is not None:
            labels = _match_label(subject_id, label_files, label_dir, label_suffix)
            if labels is None:
                hint = (f"'{subject_id}{label_suffix}.nii.gz'" if label_suffix is not None
                        else f"a file named '{subject_id}*.nii.gz'")
                raise io.InvalidInputError(f"{images[subject_id]}: no label map for subject "
                                           f"'{subject_id}' in {label_dir} (looked for {hint})")
        out.append(Subject(id=subject_id, image=images[subject_id], labels=labels))
    return out


def load_cohort(subjects, with_labels=False, check_grid=True):
    """Loads and validates the volumes of `subjects` (from `find_subjects`) into memory.

    Every image is read with `io.load_image` (all checks of `io.load_volume`), every label map with
    `io.load_labels`. All volumes must lie on the first image's grid (`io.check_same_grid`), a label
    map on its image's, and images must already be scaled to [0, 1] (up to 1e-3 of round-off,
    clipped away): run `python -m mdregnet.preprocess` first.

    Args:
        subjects: list of `Subject`.
        with_labels: also load the label maps (each subject needs one).
        check_grid: compare affines too; if False only the shapes must agree (they are stacked).

    Returns:
        `(images, labels, reference)`: images `(N, X, Y, Z)` float32 in [0, 1]; labels
        `(N, X, Y, Z)` int32, or None without `with_labels`; reference: the first image's
        `nib.Nifti1Image` (affine and header for writing outputs on this grid).

    Raises:
        InvalidInputError: a file is invalid, on another grid, out of [0, 1] or without labels.
        ValueError: `subjects` is empty.
    """
    subjects = list(subjects)
    if not subjects:
        raise ValueError("load_cohort: no subjects given")
    images = labels = reference = None
    ref_path = subjects[0].image
    for i, subject in enumerate(subjects):
        image, img = io.load_image(subject.image)
        if reference is None:
            reference = img
            images = np.empty((len(subjects),) + image.shape, np.float32)
            if with_labels:
                labels = np.empty((len(subjects),) + image.shape, np.int32)
        elif check_grid:
            io.check_same_grid(reference, ref_path, img, subject.image)
        elif image.shape != images.shape[1:]:
            raise io.InvalidInputError(f"{subject.image}: shape {image.shape} differs from "
                                       f"{images.shape[1:]} of {ref_path}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
            raise io.InvalidInputError(
                f"{subject.image}: intensities in [{lo:.4g}, {hi:.4g}], not in [0, 1]; "
                "preprocess the data first (python -m mdregnet.preprocess)")
        images[i] = np.clip(image, 0.0, 1.0)
        if with_labels:
            if subject.labels is None:
                raise io.InvalidInputError(f"{subject.image}: no label map for subject "
                                           f"'{subject.id}'")
            label, label_img = io.load_labels(subject.labels)
            if check_grid:
                io.check_same_grid(img, subject.image, label_img, subject.labels)
            elif label.shape != image.shape:
                raise io.InvalidInputError(f"{subject.labels}: shape {label.shape} differs from "
                                           f"{image.shape} of {subject.image}")
            labels[i] = label
    return images, labels, reference


def all_pairs(n, include_identical=True):
    """All ordered (moving, fixed) index pairs of `n` subjects.

    Args:
        n: number of subjects, >= 1.
        include_identical: keep the n pairs `(i, i)` (the paper trains on all n^2 pairs).

    Returns:
        int64 array `(n * n, 2)` (or `(n * (n - 1), 2)`), rows `(moving, fixed)` in row-major
        order: `(0, 0), (0, 1), ..., (n - 1, n - 1)`.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"all_pairs needs n >= 1, got {n}")
    moving, fixed = np.meshgrid(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64),
                                indexing="ij")
    pairs = np.stack([moving.reshape(-1), fixed.reshape(-1)], axis=1)
    if not include_identical:
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return pairs


def _gather(images, indices):
    """`(len(indices),) + spatial` float32 volumes from a numpy array or `H5Volumes`."""
    if isinstance(images, np.ndarray):
        return np.asarray(images[indices], np.float32)
    return np.stack([np.asarray(images[int(i)], np.float32) for i in indices])


def pair_dataset(images, batch_size=1, seed=0, shuffle=True, repeat=True, start=0):
    """A tf.data pipeline of (moving, fixed) image pairs.

    The pairs are `all_pairs(N)` (all N^2 ordered pairs, identical ones included). Epoch `e`
    visits each pair once, in the order of a stateless shuffle seeded by `(seed, e)`: the same
    `seed` gives the same sequence every time the dataset is iterated, independently of TF's
    global seed. Volumes are gathered batch by batch (`tf.numpy_function`), so an `H5Volumes`
    is read lazily. With `repeat` the epochs follow each other without end and a batch may span
    two epochs; the last incomplete batch is dropped (`drop_remainder=True`).

    Args:
        images: `(N, X, Y, Z)` (or 2D `(N, X, Y)`) array in [0, 1], or an `H5Volumes`.
        batch_size: pairs per batch.
        seed: integer seed of the per-epoch shuffle.
        shuffle: if False, pairs come in `all_pairs` order.
        repeat: cycle over epochs forever; if False, one epoch.
        start: number of batches of the stream to skip (a resumed or continued training run
            goes on where the previous one stopped); skipped on the pair indices, before any
            volume is gathered, so skipping 100,000 batches costs about a second.

    Returns:
        `tf.data.Dataset` of `(moving, fixed)`, each float32 `(B, X, Y, Z, 1)` (or `(B, X, Y, 1)`)
        with a static shape.

    Raises:
        ValueError: `images` is not `(N, X, Y[, Z])`, `batch_size < 1`, `start < 0`, or a single
            epoch without repeat has fewer than `batch_size` pairs (it would yield nothing).
    """
    import tensorflow as tf

    if not isinstance(images, (np.ndarray, H5Volumes)):
        images = np.asarray(images)
    if isinstance(images, np.ndarray) and images.dtype != np.float32:
        images = images.astype(np.float32)
    shape = tuple(int(s) for s in images.shape)
    if len(shape) not in (3, 4) or shape[0] < 1:
        raise ValueError(f"images must be (N, X, Y, Z) or (N, X, Y) with N >= 1, got {shape}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = int(start)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    n_pairs = shape[0] ** 2
    if not repeat and n_pairs < batch_size:
        raise ValueError(f"{shape[0]} images give {n_pairs} pairs, fewer than batch_size="
                         f"{batch_size}: one epoch would yield no batch")
    pairs = tf.constant(all_pairs(shape[0]), tf.int64)
    seed = int(seed)

    def epoch_pairs(epoch):
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n_pairs, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64),
                                                                   epoch]))
            return tf.data.Dataset.from_tensor_slices(tf.gather(pairs, order))
        return tf.data.Dataset.from_tensor_slices(pairs)

    epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
    ds = epochs.flat_map(epoch_pairs).batch(batch_size, drop_remainder=True)
    if start:
        ds = ds.skip(start)

    out_shape = (batch_size,) + shape[1:] + (1,)

    def load(batch):
        def gather(idx):
            return _gather(images, idx[:, 0]), _gather(images, idx[:, 1])

        moving, fixed = tf.numpy_function(gather, [batch], [tf.float32, tf.float32])
        moving = tf.reshape(moving, out_shape)
        fixed = tf.reshape(fixed, out_shape)
        return moving, fixed

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------------------
# HDF5 cache
# ------------------------------------------------------------------------------------------------
def write_hdf5(path, images, labels=None, ids=None):
    """Caches a cohort as HDF5 (atomically, `io.atomic_write`).

    Layout: dataset `images` `(N, X, Y, Z)` float32, optional `labels` `(N, X, Y, Z)` int32 (lzf
    compressed), optional `ids` (UTF-8 strings), one chunk per volume so `H5Volumes` reads one
    volume at a time; attribute `format` = "mdregnet-cohort-1".

    Args:
        path: `.h5` file.
        images: `(N, X, Y, Z)` (or `(N, X, Y)`) array, or an `H5Volumes`.
        labels: optional int array of the same shape.
        ids: optional N subject ids.

    Raises:
        ValueError: inconsistent shapes or number of ids.
        OSError: the file cannot be written (message starts with `path`).
    """
    import h5py

    path = os.fspath(path)
    if not isinstance(images, H5Volumes):
        images = np.asarray(images)
    shape = tuple(int(s) for s in images.shape)
    if len(shape) not in (3, 4) or shape[0] < 1:
        raise ValueError(f"{path}: images must be (N, X, Y, Z) or (N, X, Y), got {shape}")
    if labels is not None:
        if not isinstance(labels, H5Volumes):
            labels = np.asarray(labels)
        if tuple(labels.shape) != shape:
            raise ValueError(f"{path}: labels shape {tuple(labels.shape)} differs from images "
                             f"shape {shape}")
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(ids) != shape[0]:
            raise ValueError(f"{path}: {len(ids)} ids for {shape[0]} images")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "mdregnet-cohort-1"
            dset = f.create_dataset("images", shape=shape, dtype=np.float32,
                                    chunks=(1,) + shape[1:])
            for i in range(shape[0]):
                dset[i] = np.asarray(images[i], np.float32)
            if labels is not None:
                lset = f.create_dataset("labels", shape=shape, dtype=np.int32,
                                        chunks=(1,) + shape[1:], compression="lzf")
                for i in range(shape[0]):
                    lset[i] = np.asarray(labels[i]).astype(np.int32)
            if ids is not None:
                f.create_dataset("ids", data=np.array(ids, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))

    io.atomic_write(path, write)


class H5Volumes:
    """Lazy, read-only sequence of the volumes of one dataset of an HDF5 cohort (`write_hdf5`).

    `volumes[i]` reads volume `i` only, so a cohort larger than memory can feed `pair_dataset`.
    The file is opened on first access and stays open until `close()` (also a context manager).

    Args:
        path: HDF5 file written by `write_hdf5`.
        dataset: "images" (returned float32) or "labels" (returned int32).

    Attributes:
        shape: `(N, X, Y, Z)`; dtype: numpy dtype of the returned volumes; ids: list of subject ids
        (or None).

    Raises:
        InvalidInputError: missing or unreadable file, no such dataset.
    """

    def __init__(self, path, dataset="images"):
        import h5py

        self.path = os.fspath(path)
        self.dataset = dataset
        if not os.path.exists(self.path):
            raise io.MissingFileError(f"{self.path}: no such file")
        try:
            with h5py.File(self.path, "r") as f:
                if dataset not in f:
                    raise io.InvalidInputError(f"{self.path}: no dataset '{dataset}' (has: "
                                               f"{', '.join(sorted(f.keys())) or 'nothing'})")
                self.shape = tuple(int(s) for s in f[dataset].shape)
                self.ids = ([s.decode("utf-8") if isinstance(s, bytes) else str(s)
                             for s in f["ids"][()]] if "ids" in f else None)
        except OSError as err:
            raise io.InvalidInputError(f"{self.path}: not a readable HDF5 file ({err})") from None
        self.dtype = np.dtype(np.int32 if dataset == "labels" else np.float32)
        self._file = None
        self._lock = threading.Lock()

    def _dset(self):
        with self._lock:
            if self._file is None:
                import h5py

                self._file = h5py.File(self.path, "r")
            return self._file[self.dataset]

    def __len__(self):
        return self.shape[0]

    @property
    def ndim(self):
        return len(self.shape)

    def __getitem__(self, index):
        """Volume `index` (int, negative allowed) `(X, Y, Z)`, or stacked volumes for a slice or an
        integer array `(K, X, Y, Z)`."""
        n = len(self)
        if isinstance(index, slice):
            index = np.arange(n)[index]
        if np.ndim(index) == 0:
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"{self.path}: index {i} out of range for {n} volumes")
            return np.asarray(self._dset()[i % n], self.dtype)
        index = np.asarray(index, np.int64)
        return np.stack([self[int(i)] for i in index]) if index.size else np.empty(
            (0,) + self.shape[1:], self.dtype)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)

    def close(self):
        """Closes the file (it reopens on the next access)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"H5Volumes({self.path!r}, dataset={self.dataset!r}, shape={self.shape})"
