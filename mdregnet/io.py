"""NIfTI in and out: validated reading, atomic writing, intensity scaling and the ANTs/ITK export.

Every reader checks its input and fails with one line that starts with the offending file's path
(`InvalidInputError`), before a network or a long computation sees it. Every writer goes through
`atomic_write`: the file is written under a temporary name in its own folder and renamed into place,
so a crash or a full disk never leaves a half-written output or clobbers an older one.

Arrays follow `CONVENTIONS.md`: volumes are `(X, Y, Z)` in the voxel axes nibabel returns; images
are float32, label maps int32; displacement files written here are in voxels, except the ITK export
(`save_displacement_itk`), which is in millimetres, LPS, shape `(X, Y, Z, 1, 3)`, intent 1007.
"""

import errno
import gzip
import io as _pyio
import math
import os
import re
import tempfile

import nibabel as nib
import numpy as np

try:  # ISA-L's gzip: same format as zlib's, about 20x faster to write at level 1 (#8)
    from isal import igzip as _gzip_writer
except ImportError:  # pragma: no cover - a platform without an isal wheel
    _gzip_writer = gzip

KINDS = ("image", "labels", "field")
NIFTI_INTENT_VECTOR = 1007
_NIFTI_CLASSES = (nib.Nifti1Image, nib.Nifti2Image)
#: Largest accepted gap between a header and its data (header extensions): bytes.
_MAX_DATA_OFFSET = 256 * 2**20
#: Largest accepted amount of decompressed bytes after the data a header announces.
_MAX_TRAILING_BYTES = 64 * 2**20


class InvalidInputError(ValueError):
    """An input file is missing, unreadable or unusable.

    The message always starts with the offending file's path: `f"{path}: {problem}"`.
    """


class MissingFileError(InvalidInputError, FileNotFoundError):
    """An input file does not exist. Both an `InvalidInputError` and a `FileNotFoundError`."""


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def _fmt_shape(shape):
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def _squeeze_trailing(shape):
    shape = tuple(int(s) for s in shape)
    while len(shape) > 0 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _reason(err, path):
    """One line describing `err` without repeating `path`."""
    text = re.sub(r"(\b(File|of|from) )?[\"']?" + re.escape(path) + r"[\"']?", "", str(err))
    text = " ".join(text.split()).strip(" :-")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _open_nifti(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InvalidInputError(f"{path}: is a directory, not a NIfTI file")
    if not os.path.isfile(path):
        raise InvalidInputError(f"{path}: not a regular file (a device, pipe or socket?)")
    try:
        img = nib.load(path)
    except MemoryError:
        raise
    except Exception as err:  # nibabel raises many types (ImageFileError, HeaderDataError, ...)
        name = os.path.basename(path).lower()
        if not name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")):
            raise InvalidInputError(f"{path}: not a NIfTI file (expected a .nii or .nii.gz file; "
                                    f"{_reason(err, path)})") from None
        raise InvalidInputError(f"{path}: not a readable NIfTI file (wrong format, or a truncated "
                                f"or corrupt header; {_reason(err, path)})") from None
    if not isinstance(img, _NIFTI_CLASSES):
        raise InvalidInputError(f"{path}: not a NIfTI file (nibabel reads it as "
                                f"{type(img).__name__}); convert it to .nii.gz first")
    return img


def _check_header(img, path):
    """Refuses data types that are not real numbers and unusable voxel-to-world matrices."""
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InvalidInputError(f"{path}: data type {dtype} is not a real number type (complex or "
                                "RGB data cannot be registered)")
    affine = np.asarray(img.affine, np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InvalidInputError(f"{path}: the affine (voxel-to-world matrix) has NaN or Inf "
                                "entries; fix the header's sform/qform")
    norms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not (norms > 0).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(norms):
        raise InvalidInputError(f"{path}: degenerate affine (voxel size {_fmt_vec(norms)} mm, "
                                "zero or collinear axes); fix the header's sform/qform/pixdim")


def _read_gzip(filename, expected, path):
    """The first `expected` decompressed bytes of `filename`, after checking that the whole gzip
    stream is complete and intact (its CRC and length), without holding more than `expected`
    bytes (and refusing more than `_MAX_TRAILING_BYTES` after them)."""
    with gzip.open(filename, "rb") as f:
        raw = f.read(expected)
        if len(raw) < expected:
            raise InvalidInputError(f"{path}: truncated or corrupt data (the header announces "
                                    f"{expected} bytes with the header, the file decompresses to "
                                    f"{len(raw)})")
        trailing = 0
        while True:
            chunk = f.read(2**20)
            if not chunk:
                break
            trailing += len(chunk)
            if trailing > _MAX_TRAILING_BYTES:
                raise InvalidInputError(f"{path}: corrupt: more than {_MAX_TRAILING_BYTES} bytes "
                                        "follow the data its header announces")
    return raw


def _read_data(img, path, dtype):
    """The header-scaled data of `img` as `dtype` (None: as stored, or float when scaled).

    A gzip-compressed file is decompressed once, completely, so a truncated or corrupt stream
    is refused even where the missing part holds no voxel (the gzip trailer); an uncompressed
    file must be at least as long as its header says.
    """
    proxy = img.dataobj  # nibabel's ArrayProxy: shape, dtype, offset and scaling of the data
    try:
        offset = int(proxy.offset)
        nbytes = math.prod(int(n) for n in proxy.shape) * np.dtype(proxy.dtype).itemsize
        if not 0 <= offset <= _MAX_DATA_OFFSET:
            raise InvalidInputError(f"{path}: corrupt header: data offset {offset} bytes")
        filename = img.file_map["image"].filename
        if filename and os.fspath(filename).lower().endswith(".gz"):
            raw = _read_gzip(filename, offset + nbytes, path)
            in_memory = nib.arrayproxy.ArrayProxy(
                _pyio.BytesIO(raw), (proxy.shape, proxy.dtype, offset, proxy.slope, proxy.inter),
                order=proxy.order)
            return np.asarray(in_memory, dtype=dtype)
        if filename and not os.fspath(filename).lower().endswith((".bz2", ".zst")):
            size = os.path.getsize(filename)
            if size < offset + nbytes:
                raise InvalidInputError(f"{path}: truncated or corrupt data (the header announces "
                                        f"{offset + nbytes} bytes with the header, the file holds "
                                        f"{size})")
        return np.asarray(img.dataobj, dtype=dtype)
    except (InvalidInputError, MemoryError):
        raise
    except Exception as err:  # EOFError, zlib.error, BadGzipFile, OSError, ValueError, ...
        raise InvalidInputError(f"{path}: truncated or corrupt data ({_reason(err, path)})") \
            from None


def _check_finite(array, path):
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        value = array[first]
        raise InvalidInputError(f"{path}: {len(bad)} voxel(s) are NaN or Inf "
                                f"(first at index {first}: {value})")


def load_volume(path, kind="image", max_voxels=512**3):
    """Reads and validates one NIfTI volume.

    Checks, in this order, each failing with an `InvalidInputError` whose message starts with
    `path`: the file exists (`MissingFileError`, also a `FileNotFoundError`); nibabel reads it as
    NIfTI (not another format, not random bytes); its header shape is 3D after dropping trailing
    singleton axes (`(X, Y, Z)` or `(X, Y, Z, 1)`; 2D slices and 4D series are refused), or for a
    field `(X, Y, Z, 3)` / `(X, Y, Z, 1, 3)`; the grid has at most `max_voxels` voxels, checked on
    the header before any data is read (a header announcing 4000^3 voxels is refused without
    allocating anything); the data type is a real number type (not complex, not RGB); the affine
    is finite and not degenerate (no zero-size or collinear axes); the data decompresses
    completely, gzip trailer included, and an uncompressed file is as long as its header says
    (truncated or corrupt files); no voxel is NaN or Inf; an image is not all zero; a label map
    holds integers that fit in int32.

    Args:
        path: a `.nii` or `.nii.gz` file.
        kind: "image" (intensities), "labels" (integer label map) or "field" (a vector per voxel,
            e.g. a displacement in voxels).
        max_voxels: largest accepted number of grid voxels `X * Y * Z` (components of a field not
            counted).

    Returns:
        `(array, img)`: `array` is `(X, Y, Z)` float32 for an image (scaling slope and intercept
        applied), `(X, Y, Z)` int32 for labels, `(X, Y, Z, 3)` float32 for a field; `img` is the
        `nib.Nifti1Image` (or `Nifti2Image`) with its affine and header, data not cached.

    Raises:
        InvalidInputError: any of the problems above; `MissingFileError` for a missing file.
        ValueError: `kind` is not one of "image", "labels", "field".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = os.fspath(path)
    img = _open_nifti(path)
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if kind == "field":
        if len(shape) == 4 and shape[3] == 3:
            grid = shape[:3]
        elif len(shape) == 5 and shape[3] == 1 and shape[4] == 3:
            grid = shape[:3]
        else:
            raise InvalidInputError(f"{path}: a displacement field must have shape (X, Y, Z, 3) or "
                                    f"(X, Y, Z, 1, 3), got {_fmt_shape(shape)}")
    else:
        squeezed = _squeeze_trailing(shape)
        if len(squeezed) != 3:
            what = {0: "a single value", 1: "1D", 2: "2D"}.get(len(squeezed), f"{len(squeezed)}D")
            raise InvalidInputError(f"{path}: the {kind} is {what} (shape {_fmt_shape(shape)}); "
                                    "expected a 3D volume (X, Y, Z)")
        grid = squeezed
    if min(grid) < 1:
        raise InvalidInputError(f"{path}: empty grid (shape {_fmt_shape(shape)})")
    n_voxels = math.prod(grid)  # Python ints: NIfTI-2 sizes can overflow int64
    if n_voxels > max_voxels:
        raise InvalidInputError(f"{path}: grid {_fmt_shape(grid)} has {n_voxels} voxels, more than "
                                f"max_voxels={max_voxels}; refusing to read it")
    _check_header(img, path)

    if kind == "labels":
        raw = _read_data(img, path, None)
        if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
            array = raw
        else:
            _check_finite(raw, path)
            rounded = np.round(raw)
            off = rounded != raw
            if off.any():
                first = tuple(int(i) for i in np.argwhere(off)[0])
                raise InvalidInputError(
                    f"{path}: a label map must hold integers, but {int(off.sum())} voxel(s) do not "
                    f"(first at index {first}: {raw[first]}); is this an image, not labels?")
            array = rounded
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInputError(f"{path}: label values [{array.min()}, {array.max()}] do not "
                                    "fit in int32")
        array = array.astype(np.int32, copy=False)
    else:
        array = _read_data(img, path, np.float32)
        _check_finite(array, path)
        if kind == "image" and not array.any():
            raise InvalidInputError(f"{path}: the image is all zero")
    target = grid + (3,) if kind == "field" else grid
    return array.reshape(target), img


def load_image(path, **kw):
    """`load_volume(path, kind="image", **kw)`: `(X, Y, Z)` float32 and the nibabel image."""
    return load_volume(path, kind="image", **kw)


def load_labels(path, **kw):
    """`load_volume(path, kind="labels", **kw)`: `(X, Y, Z)` int32 and the nibabel image."""
    return load_volume(path, kind="labels", **kw)


def check_same_grid(img_a, path_a, img_b, path_b, atol=1e-3):
    """Checks that two images share one voxel grid: same `(X, Y, Z)` and the same affine.

    Args:
        img_a, img_b: nibabel images (e.g. from `load_volume`); only the first three axes of
            their shapes are compared, so a field can be checked against an image.
        path_a, path_b: their files, for the message.
        atol: largest accepted absolute difference between affine entries (millimetres).

    Raises:
        InvalidInputError: `"{path_b}: not on the same grid as {path_a}: ..."` saying what differs
            (shape, voxel size, orientation, origin), or `"{path}: the affine ... is not a finite
            4x4 matrix"`.
    """
    shape_a = tuple(int(s) for s in img_a.shape[:3])
    shape_b = tuple(int(s) for s in img_b.shape[:3])
    if shape_a != shape_b:
        raise InvalidInputError(f"{path_b}: not on the same grid as {path_a}: shape "
                                f"{_fmt_shape(shape_b)} vs {_fmt_shape(shape_a)}")
    aff_a = np.asarray(img_a.affine, np.float64)
    aff_b = np.asarray(img_b.affine, np.float64)
    for aff, path in ((aff_a, path_a), (aff_b, path_b)):
        if aff.shape != (4, 4) or not np.isfinite(aff).all():
            raise InvalidInputError(f"{path}: the affine (voxel-to-world matrix) is not a finite "
                                    "4x4 matrix")
    if not np.allclose(aff_a, aff_b, rtol=0.0, atol=atol):
        diffs = []
        zoom_a = np.sqrt((aff_a[:3, :3] ** 2).sum(axis=0))
        zoom_b = np.sqrt((aff_b[:3, :3] ** 2).sum(axis=0))
        if not np.allclose(zoom_a, zoom_b, rtol=0.0, atol=atol):
            diffs.append(f"voxel size {_fmt_vec(zoom_b)} vs {_fmt_vec(zoom_a)} mm")
        codes_a, codes_b = _axcodes(aff_a), _axcodes(aff_b)
        if codes_a != codes_b:
            diffs.append(f"orientation {codes_b} vs {codes_a}")
        if not np.allclose(aff_a[:3, 3], aff_b[:3, 3], rtol=0.0, atol=atol):
            diffs.append(f"origin {_fmt_vec(aff_b[:3, 3])} vs {_fmt_vec(aff_a[:3, 3])} mm")
        if not diffs:
            diffs.append("direction cosines")
        max_diff = float(np.abs(aff_a - aff_b).max())
        raise InvalidInputError(f"{path_b}: not on the same grid as {path_a}: affines differ by "
                                f"up to {max_diff:.4g} (atol {atol}): " + "; ".join(diffs))


def _axcodes(affine):
    """Orientation letters such as "RAS" ('?' for an axis nibabel cannot name)."""
    try:
        return "".join(c or "?" for c in nib.aff2axcodes(affine))
    except Exception:  # a degenerate matrix  # noqa: BLE001
        return "???"


def _fmt_vec(values):
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def check_output_dir(path):
    """Checks, creating nothing, that `path` is or can become a folder this process writes into.

    Called by the command lines before any long computation, so an unusable `--out` fails at
    once. (As root, permission bits do not stop writes and are not checked here; the write
    itself then fails cleanly through `atomic_write`.)

    Args:
        path: the output folder; it or its nearest existing parent must be a writable directory.

    Raises:
        NotADirectoryError: `path`, or the nearest existing path above it, is not a directory.
        PermissionError: that directory is not writable. Messages start with `path`.
    """
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "it exists and is not a directory" if probe == path else \
            f"{probe} is not a directory"
        raise NotADirectoryError(errno.ENOTDIR, f"{path}: cannot write outputs here ({where})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{path}: cannot write outputs here ({probe} is not "
                              "writable)")


def publish_files(staging, out_dir, names):
    """Moves the files `names` from the folder `staging` into `out_dir` (created if needed): all
    of them or, when one move fails, none (those moved are removed again, and `out_dir` too when
    this call created it). `staging` must be on the file system of `out_dir` (renames).

    Raises:
        OSError: the move that failed, after the rollback.
    """
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    moved = []
    try:
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            moved.append(name)
    except BaseException:
        for name in moved:
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass
        if created:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise


def relocated_error(err, staging, out_dir):
    """`err` (an OSError or ValueError raised while writing into the temporary folder `staging`)
    with `staging` replaced by `out_dir` in its message, so a failure names the output the user
    asked for, not a temporary file that no longer exists. Other errors are returned unchanged.
    """
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    if staging not in text or not isinstance(err, (OSError, ValueError)):
        return err
    text = text.replace(staging, out_dir)
    if isinstance(err, OSError):
        new = OSError(err.errno, text) if err.errno is not None else OSError(text)
    else:
        try:
            new = type(err)(text)
        except Exception:  # noqa: BLE001 -- a type with another constructor
            return err
    new.__cause__ = err
    return new


def atomic_write(path, write_fn):
    """Writes a file atomically: `write_fn(tmp_path)`, then `os.replace(tmp_path, path)`.

    The temporary file lies in the folder of `path` (so the rename is atomic on one file system),
    is named `.tmp-XXXXXXXX-<basename>` (same extension, so writers that look at it, like nibabel's
    `.nii.gz`, choose the right format), is flushed to disk before the rename and removed on any
    failure; an existing `path` stays untouched until the rename. The new file gets the usual
    permissions (0o666 minus the umask), not the private ones of `tempfile.mkstemp`.

    Args:
        path: the final file; its folder must exist.
        write_fn: callable writing the whole file to the path it is given.

    Raises:
        OSError: the folder is missing or unwritable, the disk is full, ...: the message starts
            with `path` and keeps the errno (so `PermissionError` etc. still match).
        Exception: any other error of `write_fn`, re-raised with `path` prefixed to its message
            where the type allows it (else unchanged, with a note naming `path`).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        os.close(fd)
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except BaseException as err:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        if not isinstance(err, Exception) or path in str(err):
            raise
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            if not os.path.isdir(folder):
                reason = f"{reason}: folder {folder} does not exist"
            if err.errno is not None:
                raise OSError(err.errno, f"{path}: cannot write ({reason})") from err
            raise OSError(f"{path}: cannot write ({reason})") from err
        try:
            new = type(err)(f"{path}: cannot write ({err})")
        except Exception:
            err.add_note(f"while writing {path}")
            raise err
        raise new from err


def save_volume(path, array, affine, header=None, dtype=None):
    """Saves an array as NIfTI, atomically (`atomic_write`).

    Args:
        path: `.nii` or `.nii.gz` file.
        array: `(X, Y, Z)` or `(X, Y, Z, ...)` array (e.g. a displacement `(X, Y, Z, 3)` in voxels).
            bool is stored as uint8; int64 as int32 when `dtype` is not given.
        affine: `(4, 4)` voxel-to-world (RAS, mm) matrix, usually the fixed image's.
        header: optional NIfTI header to keep (copied, never modified): units, descriptions, codes.
            Its data shape, data dtype and scaling are replaced by the array's.
        dtype: on-disk data type; default: the array's.

    Raises:
        OSError: the file cannot be written (message starts with `path`).
        ValueError: `affine` is not `(4, 4)`, or the values do not fit in an integer `dtype`
            (float values are rounded to the nearest integer first).
    """
    array = np.asarray(array)
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if dtype is None:
        dtype = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
                 np.dtype(np.float16): np.float32}.get(array.dtype, array.dtype)
    dtype = np.dtype(dtype)
    if array.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            if np.issubdtype(array.dtype, np.floating):
                if not np.isfinite(array).all():
                    raise ValueError(f"{path}: NaN or Inf values cannot be stored as {dtype}")
                array = np.rint(array)
            info = np.iinfo(dtype)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(f"{path}: values [{array.min()}, {array.max()}] do not fit in "
                                 f"{dtype}")
        array = array.astype(dtype)
    if header is not None:
        header = nib.Nifti1Header.from_header(header)
        header.set_data_dtype(dtype)
        header.set_slope_inter(None, None)
    img = nib.Nifti1Image(array, affine, header=header, dtype=dtype)
    img.set_data_dtype(dtype)
    atomic_write(path, lambda tmp: _write_nifti(img, tmp))


def _write_nifti(img, path):
    """Writes a single-file NIfTI image to `path`; gzip-compressed when it ends in `.gz`.

    nibabel's own `.nii.gz` writer goes through zlib at level 1 (about 0.2 s for a 2 mm
    displacement field); ISA-L's (`isal.igzip`, level 1, when installed) writes the same standard
    gzip stream, of about the same size, some 20 times faster. Any gzip reader opens it.
    """
    path = os.fspath(path)
    if not path.endswith(".gz"):
        nib.save(img, path)
        return
    data = _gzip_writer.compress(img.to_bytes(), compresslevel=1)
    with open(path, "wb") as f:
        f.write(data)


def save_displacement_itk(path, disp_vox, affine, header=None):
    """Exports a displacement field for ANTs / ITK / SimpleITK (`antsApplyTransforms -t path`).

    The field in voxels of the grid (CONVENTIONS.md) becomes a physical displacement in mm,
    `d_world = A[:3, :3] @ d_vox`, converted from the NIfTI world (RAS) to ITK's LPS by negating
    its x and y components, and stored as `(X, Y, Z, 1, 3)` float32 with intent code 1007
    (vector), on the same affine (ITK applies the RAS-to-LPS change to the affine itself).

    Args:
        path: `.nii.gz` file to write (atomically).
        disp_vox: `(X, Y, Z, 3)` displacement in voxels (a leading batch axis of 1 is accepted).
        affine: `(4, 4)` voxel-to-world matrix of the grid (the fixed image's).
        header: optional header to keep (copied), e.g. the fixed image's.

    Raises:
        ValueError: `disp_vox` is not `(X, Y, Z, 3)` or `affine` not `(4, 4)`.
        OSError: the file cannot be written (message starts with `path`).
    """
    disp = np.asarray(disp_vox, np.float64)
    if disp.ndim == 5 and disp.shape[0] == 1:
        disp = disp[0]
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"{path}: a 3D displacement (X, Y, Z, 3) is needed, got shape "
                         f"{disp.shape}")
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
    world = np.einsum("ij,xyzj->xyzi", affine[:3, :3], disp)
    world[..., 0] *= -1.0
    world[..., 1] *= -1.0
    world = world.astype(np.float32)[:, :, :, None, :]
    if header is not None:
        header = nib.Nifti1Header.from_header(header)
    else:
        header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    header.set_intent("vector", (), name="")
    header.set_xyzt_units("mm", header.get_xyzt_units()[1])
    img = nib.Nifti1Image(world, affine, header=header, dtype=np.float32)
    img.header.set_intent("vector", (), name="")
    atomic_write(path, lambda tmp: _write_nifti(img, tmp))


# ------------------------------------------------------------------------------------------------
# Intensities
# ------------------------------------------------------------------------------------------------
def normalize_intensity(array, mask=None, lower=0.5, upper=99.5):
    """Robust min-max scaling to [0, 1]: the `lower` and `upper` percentiles map to 0 and 1.

    Percentiles are taken over the voxels inside `mask` when it is given (e.g. the brain); all
    voxels are scaled and clipped to [0, 1] (voxels outside the mask are not zeroed). If the two
    percentiles coincide the plain minimum and maximum are used; a constant array gives zeros.

    Args:
        array: intensities, any shape, finite.
        mask: optional boolean array of the same shape, with at least one True voxel.
        lower, upper: percentiles in [0, 100], `lower < upper`.

    Returns:
        float32 array of `array`'s shape, values in [0, 1].

    Raises:
        ValueError: non-finite values, a mask of another shape or an empty mask, bad percentiles.
    """
    array = np.asarray(array, np.float32)
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
    if not np.isfinite(array).all():
        raise ValueError("normalize_intensity: the array has NaN or Inf values")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != array.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the array's {array.shape}")
        values = array[mask]
        if values.size == 0:
            raise ValueError("normalize_intensity: the mask is empty")
    else:
        values = array.reshape(-1)
    if values.size == 0:
        return np.zeros_like(array)
    lo, hi = np.percentile(values, [lower, upper])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros_like(array)
    out = (array - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
