"""Hostile and broken input (issue #7): every command line refuses it in one line, exits non-zero
and leaves no partial output.

For `python -m mdregnet.infer`, `.preprocess`, `.evaluate` and `.train`, each bad input of the
catalogue below (truncated or corrupt .nii.gz, 2D or 4D images, NaN/Inf voxels, an all-zero image,
non-integer labels, labels on another grid or with another affine, a header announcing 4000^3
voxels in a tiny file, a PNG or a text file named .nii.gz, a directory, a missing file) is given to
the app's `main` in-process (flags parsed on a fresh `FlagValues`, as `python -m` would), and the
test checks: the exit message is ONE line, starts with "mdregnet.<app>: error: " (or is the
"FAILED" line of a preprocess batch), names the offending file and says what is wrong; the exit
status is non-zero; the output folder holds no file. A few real subprocesses check the exit codes.
Unwritable output folders are real (a path under a regular file; a chmod 0o500 folder when not
root); a full disk is simulated by making `os.fsync` fail with ENOSPC on the N-th written file
(where a real full disk reports a delayed write error), the one mock allowed here.

Model directories are data only: a tampered `config.json` (unknown model, unknown or mistyped
hyper-parameters, nonsense input shapes, extra fields such as "__class__", non-JSON, a pickle) or
weights that do not fit the architecture are refused by `models.load` with a message naming the
file, and nothing in them is executed.

Volumes are 16^3 (models: a tiny voxelmorph) so the whole file runs in well under a minute of CPU
plus the subprocesses.
"""

import ast
import errno
import gzip
import io as pyio
import json
import os
import pickle
import re
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
from absl import flags
from scipy import ndimage

from mdregnet import evaluate, infer, io, models, preprocess, train
from mdregnet.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 16)
AFFINE = np.array([[2.0, 0, 0, -16], [0, 2.0, 0, -16], [0, 0, 2.0, -16], [0, 0, 0, 1]])
TINY = {"enc_features": [4, 8, 8, 8], "dec_features": [8, 8, 8, 8, 8, 4, 4]}


# ------------------------------------------------------------------------------------------------
# Good inputs and the catalogue of bad ones
# ------------------------------------------------------------------------------------------------
def subject(seed=0, shape=SHAPE):
    """A smooth ellipsoid 'brain' in [0, 1] with 2 labels (its halves), background 0."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2.0 + np.random.default_rng(seed).uniform(-1, 1, 3)
    inside = sum(((grid[a] - centre[a]) / (shape[a] * 0.32)) ** 2 for a in range(3)) < 1.0
    labels = (inside * (1 + (grid[0] > centre[0]))).astype(np.int16)
    image = ndimage.gaussian_filter(np.where(inside, 0.5 + 0.2 * labels, 0.0), 1.0)
    return (image / image.max()).astype(np.float32), labels


def save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def _truncated(path):
    save(path, subject()[0])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])


def _corrupt(path):
    save(path, np.random.default_rng(1).random(SHAPE).astype(np.float32))
    raw = bytearray(open(path, "rb").read())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    open(path, "wb").write(bytes(raw))


def _with_voxel(value):
    def make(path):
        image = subject()[0]
        image[3, 4, 5] = value
        save(path, image)
    return make


def _huge(path):
    """A header announcing 4000^3 uint8 voxels (64 GB) in a file of a few hundred bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 64)


def _png(path):
    from PIL import Image

    buffer = pyio.BytesIO()
    Image.fromarray((subject()[0][:, :, 8] * 255).astype(np.uint8)).save(buffer, format="PNG")
    open(path, "wb").write(buffer.getvalue())


def _text(path):
    open(path, "w").write("subject,age\ns1,42\n")


def _directory(path):
    os.makedirs(path)


def _missing(path):
    pass


#: name -> (writes a bad image at the path it is given, regex of the problem in the message)
BAD_IMAGES = {
    "truncated": (_truncated, "truncated or corrupt"),
    "corrupt": (_corrupt, "truncated or corrupt"),
    "2d": (lambda p: save(p, subject()[0][:, :, 8]), r"\b2D\b.*16x16"),
    "4d": (lambda p: save(p, np.random.default_rng(0).random(SHAPE + (3,), np.float32)),
           r"\b4D\b.*16x16x16x3"),
    "nan": (_with_voxel(np.nan), r"NaN or Inf.*\(3, 4, 5\)"),
    "inf": (_with_voxel(np.inf), r"NaN or Inf.*\(3, 4, 5\)"),
    "all_zero": (lambda p: save(p, np.zeros(SHAPE, np.float32)), "all zero"),
    "huge": (_huge, r"4000x4000x4000.*max_voxels"),
    "png": (_png, "not a readable NIfTI"),
    "text": (_text, "not a readable NIfTI"),
    "directory": (_directory, "is a directory"),
    "missing": (_missing, "no such file"),
}
#: Bad images that a folder scan cannot meet (it lists existing files only).
NOT_IN_FOLDERS = ("directory", "missing")
FOLDER_IMAGES = [name for name in BAD_IMAGES if name not in NOT_IN_FOLDERS]


def _float_labels(path):
    labels = subject()[1].astype(np.float32)
    labels[8, 8, 8] = 1.5
    save(path, labels)


def _shifted_affine():
    affine = AFFINE.copy()
    affine[:3, 3] += [0.0, 6.0, 0.0]
    return affine


#: name -> (writes a bad label map for the image `subject()`, regex of the problem)
BAD_LABELS = {
    "non_integer": (_float_labels, r"integers.*\(8, 8, 8\).*1\.5"),
    "other_grid": (lambda p: save(p, subject(shape=(16, 16, 32))[1]),
                   r"not on the same grid.*shape 16x16x32 vs 16x16x16"),
    "other_affine": (lambda p: save(p, subject()[1], _shifted_affine()),
                     r"not on the same grid.*origin"),
    "nan": (lambda p: save(p, np.full(SHAPE, np.nan, np.float32)), "NaN or Inf"),
    "4d": (lambda p: save(p, np.zeros(SHAPE + (2,), np.int16)), r"\b4D\b"),
}


# ------------------------------------------------------------------------------------------------
# Helpers: run a main in-process, check its message and the output folder
# ------------------------------------------------------------------------------------------------
def run_main(module, argv, monkeypatch):
    """`module.main` as `python -m module argv` runs it: flags parsed on a fresh FlagValues put
    in place of the module's FLAGS. Returns the exit code: the `sys.exit` message (status 1),
    or the returned status."""
    fv = flags.FlagValues()
    module.define_flags(fv)
    fv([module.__name__] + [str(a) for a in argv])
    monkeypatch.setattr(module, "FLAGS", fv)
    try:
        return module.main([module.__name__])
    except SystemExit as exc:
        return exc.code


def assert_one_line_error(code, app, path, problem):
    """`code` is the `sys.exit` message of `mdregnet.<app>`: one line naming `path` and matching
    `problem` (a string passed to sys.exit means exit status 1)."""
    assert isinstance(code, str), f"expected an error exit, got {code!r}"
    assert code.startswith(f"mdregnet.{app}: error: "), code
    assert "\n" not in code and "Traceback" not in code, code
    assert str(path) in code, f"{path} not named in: {code}"
    assert re.search(problem, code), f"{problem!r} not in: {code}"


def files_under(folder):
    """Every file (hidden ones included) below `folder`, relative paths; [] if it is absent."""
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(out)


def temporaries(folder):
    """Temporary files or folders (`.tmp` in the name) anywhere below `folder`."""
    found = []
    for root, dirs, names in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + names if ".tmp" in n]
    return found


class FullDisk:
    """Makes the `fail_at`-th `os.fsync` (and every later one) raise ENOSPC: `io.atomic_write`
    syncs each file before renaming it into place, which is where a full disk (delayed
    allocation) reports. Counts calls so a test can check the failure really happened."""

    def __init__(self, monkeypatch, fail_at=1):
        self.calls = 0
        self.fail_at = fail_at
        self._fsync = os.fsync
        monkeypatch.setattr(io.os, "fsync", self)

    def __call__(self, fd):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._fsync(fd)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "tiny"
    models.save(models.build("voxelmorph", SHAPE, **TINY), str(directory))
    return str(directory)


@pytest.fixture
def pair(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (fixed, fixed_labels), (moving, moving_labels) = subject(0), subject(1)
    return {"fixed": save(folder / "fixed.nii.gz", fixed),
            "moving": save(folder / "moving.nii.gz", moving),
            "fixed_labels": save(folder / "fixed_seg.nii.gz", fixed_labels),
            "moving_labels": save(folder / "moving_seg.nii.gz", moving_labels)}


def write_dataset(root, n=3):
    """`root/images/s<i>.nii.gz` and `root/labels/s<i>.nii.gz`, preprocessed (in [0, 1])."""
    for kind in ("images", "labels"):
        os.makedirs(os.path.join(root, kind), exist_ok=True)
    for i in range(n):
        image, labels = subject(i)
        save(os.path.join(root, "images", f"s{i}.nii.gz"), image)
        save(os.path.join(root, "labels", f"s{i}.nii.gz"), labels)
    return str(root)


def replace_file(path, make):
    """Puts the bad file made by `make` at `path` (removing the good one first)."""
    if os.path.isdir(path):
        os.rmdir(path)
    elif os.path.exists(path):
        os.remove(path)
    make(str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------
# infer
# ------------------------------------------------------------------------------------------------
def _infer_argv(pair, model_dir, out, **override):
    files = dict(pair, **override)
    argv = ["--moving", files["moving"], "--fixed", files["fixed"], "--model", model_dir,
            "--out", out, "--device", "cpu", "--nofigure"]
    for key in ("moving_labels", "fixed_labels"):
        if files.get(key):
            argv += [f"--{key}", files[key]]
    return argv


@pytest.mark.parametrize("role", ["moving", "fixed"])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_infer_refuses_a_bad_image(case, role, pair, model_dir, tmp_path, monkeypatch):
    make, problem = BAD_IMAGES[case]
    bad = replace_file(tmp_path / "in" / f"bad_{role}.nii.gz", make)
    out = tmp_path / "out"
    code = run_main(infer, _infer_argv(pair, model_dir, out, **{role: bad}), monkeypatch)
    assert_one_line_error(code, "infer", bad, problem)
    assert not out.exists()
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("role", ["moving_labels", "fixed_labels"])
@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_infer_refuses_a_bad_label_map(case, role, pair, model_dir, tmp_path, monkeypatch):
    make, problem = BAD_LABELS[case]
    bad = replace_file(tmp_path / "in" / f"bad_{role}.nii.gz", make)
    out = tmp_path / "out"
    code = run_main(infer, _infer_argv(pair, model_dir, out, **{role: bad}), monkeypatch)
    assert_one_line_error(code, "infer", bad, problem)
    assert not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_infer_refuses_an_unusable_output_folder_before_running(where, pair, model_dir, tmp_path,
                                                                monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "out" if where == "under_a_file" else blocker
    code = run_main(infer, _infer_argv(pair, model_dir, out), monkeypatch)
    assert_one_line_error(code, "infer", out, "cannot write outputs here.*not a directory")
    assert blocker.read_text() == "not a folder\n"
    assert temporaries(tmp_path) == []


def test_infer_refuses_a_read_only_output_folder(pair, model_dir, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (the real "
                        "unwritable case is covered by the path-under-a-file tests)")
        out = parent / "out"
        code = run_main(infer, _infer_argv(pair, model_dir, out), monkeypatch)
        assert_one_line_error(code, "infer", out, "not writable|Permission denied")
        assert files_under(parent) == []
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("fail_at", [1, 3])
def test_infer_full_disk_leaves_nothing(fail_at, pair, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    disk = FullDisk(monkeypatch, fail_at=fail_at)
    code = run_main(infer, _infer_argv(pair, model_dir, out), monkeypatch)
    assert disk.calls >= fail_at
    # The message names a final output (not a temporary name) and the problem.
    assert_one_line_error(code, "infer", out, "No space left on device")
    assert re.search(re.escape(str(out)) + r"/\w+\.(nii\.gz|json): cannot write", code), code
    assert not out.exists()
    assert temporaries(tmp_path) == []


def test_infer_full_disk_keeps_an_earlier_run_intact(pair, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    infer.register(model_dir, pair["moving"], pair["fixed"], str(out), figure=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    FullDisk(monkeypatch, fail_at=2)
    with pytest.raises(OSError, match="No space left on device") as info:
        infer.register(model_dir, pair["fixed"], pair["moving"], str(out), figure=False)
    assert info.value.errno == errno.ENOSPC
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert temporaries(tmp_path) == []


def test_infer_cohort_mode_reports_a_bad_subject_and_leaves_no_folder_for_it(
        pair, model_dir, tmp_path, monkeypatch, capsys):
    cohort_dir = tmp_path / "cohort"
    cohort_dir.mkdir()
    save(cohort_dir / "s0.nii.gz", subject(2)[0])
    bad = replace_file(cohort_dir / "s1.nii.gz", _with_voxel(np.inf))
    out = tmp_path / "out"
    code = run_main(infer, ["--moving_dir", cohort_dir, "--fixed", pair["fixed"], "--model",
                            model_dir, "--out", out, "--device", "cpu"], monkeypatch)
    printed = capsys.readouterr().out
    assert isinstance(code, str) and "\n" not in code, code
    assert re.match(r"mdregnet\.infer: 1 of 2 subjects failed \(see .*cohort\.csv\)$", code), code
    assert any("s1" in line and bad in line and "NaN or Inf" in line
               for line in printed.splitlines()), printed
    assert (out / "s0" / "summary.json").is_file() and not (out / "s1").exists()
    assert temporaries(tmp_path) == []


def test_infer_cohort_mode_refuses_an_unusable_output_folder(pair, model_dir, tmp_path,
                                                             monkeypatch):
    cohort_dir = tmp_path / "cohort"
    cohort_dir.mkdir()
    save(cohort_dir / "s0.nii.gz", subject(2)[0])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"
    code = run_main(infer, ["--moving_dir", cohort_dir, "--fixed", pair["fixed"], "--model",
                            model_dir, "--out", out, "--device", "cpu"], monkeypatch)
    assert_one_line_error(code, "infer", out, "cannot write outputs here.*not a directory")


# ------------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------------
def _evaluate_argv(data_dir, model_dir, out):
    return ["--model", model_dir, "--data_dir", data_dir, "--out", out, "--device", "cpu"]


@pytest.mark.parametrize("case", FOLDER_IMAGES)
def test_evaluate_refuses_a_bad_image(case, model_dir, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    make, problem = BAD_IMAGES[case]
    bad = replace_file(os.path.join(data_dir, "images", "s1.nii.gz"), make)
    out = tmp_path / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out), monkeypatch)
    assert_one_line_error(code, "evaluate", bad, problem)
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_evaluate_refuses_a_bad_label_map(case, model_dir, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    make, problem = BAD_LABELS[case]
    bad = replace_file(os.path.join(data_dir, "labels", "s2.nii.gz"), make)
    out = tmp_path / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out), monkeypatch)
    assert_one_line_error(code, "evaluate", bad, problem)
    assert not out.exists()


def test_evaluate_refuses_subjects_on_different_grids(model_dir, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    image, labels = subject(1)
    bad = save(os.path.join(data_dir, "images", "s1.nii.gz"), image, _shifted_affine())
    save(os.path.join(data_dir, "labels", "s1.nii.gz"), labels, _shifted_affine())
    out = tmp_path / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out), monkeypatch)
    assert_one_line_error(code, "evaluate", bad, r"not on the same grid as .*s0\.nii\.gz.*origin")
    assert not out.exists()


def test_evaluate_refuses_a_binary_subject_list(model_dir, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    listing = tmp_path / "subjects.txt"
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    out = tmp_path / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out) + ["--subjects", listing],
                    monkeypatch)
    assert_one_line_error(code, "evaluate", listing, "not a text file")
    assert not out.exists()


def test_evaluate_refuses_an_unusable_output_folder_before_running(model_dir, tmp_path,
                                                                   monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out), monkeypatch)
    assert_one_line_error(code, "evaluate", out, "cannot write outputs here.*not a directory")
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("fail_at", [1, 3])
def test_evaluate_full_disk_leaves_nothing(fail_at, model_dir, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    out = tmp_path / "eval"
    disk = FullDisk(monkeypatch, fail_at=fail_at)
    code = run_main(evaluate, _evaluate_argv(data_dir, model_dir, out), monkeypatch)
    assert disk.calls >= fail_at
    assert_one_line_error(code, "evaluate", out, r"\w+\.(csv|md|json): cannot write \(No space")
    assert not out.exists()
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# train (the run fails while loading its data, before its workdir is created)
# ------------------------------------------------------------------------------------------------
def _train_argv(data_dir, workdir, *extra):
    return ["--model", "voxelmorph", "--hparams", json.dumps(TINY), "--data_dir", data_dir,
            "--workdir", workdir, "--steps", "1", "--strategy", "default",
            "--mixed_precision", "off", *extra]


@pytest.mark.parametrize("case", FOLDER_IMAGES)
def test_train_refuses_a_bad_image(case, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    make, problem = BAD_IMAGES[case]
    bad = replace_file(os.path.join(data_dir, "images", "s1.nii.gz"), make)
    workdir = tmp_path / "run"
    code = run_main(train, _train_argv(data_dir, workdir), monkeypatch)
    assert_one_line_error(code, "train", bad, problem)
    assert not workdir.exists()


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_train_refuses_a_bad_validation_label_map(case, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    make, problem = BAD_LABELS[case]
    bad = replace_file(os.path.join(data_dir, "labels", "s2.nii.gz"), make)
    listing = tmp_path / "val.txt"
    listing.write_text("s0\ns2\n")
    workdir = tmp_path / "run"
    code = run_main(train, _train_argv(data_dir, workdir, "--val_subjects", listing), monkeypatch)
    assert_one_line_error(code, "train", bad, problem)
    assert not workdir.exists()


def test_train_refuses_a_binary_subject_list(tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"\xff\xfe\x00\x01garbage")
    workdir = tmp_path / "run"
    code = run_main(train, _train_argv(data_dir, workdir, "--train_subjects", listing),
                    monkeypatch)
    assert_one_line_error(code, "train", listing, "not a text file")
    assert not workdir.exists()


def test_train_refuses_an_unusable_workdir(tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    workdir = blocker / "run"
    code = run_main(train, _train_argv(data_dir, workdir), monkeypatch)
    assert_one_line_error(code, "train", workdir, "(?i)not a directory")
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------------------------
# preprocess (a bad subject is reported in one FAILED line and the batch exits with status 1)
# ------------------------------------------------------------------------------------------------
def _preprocess_argv(data_dir, out, *extra):
    return ["--images", os.path.join(data_dir, "images"), "--labels",
            os.path.join(data_dir, "labels"), "--out", out, "--shape", "16,16,16",
            "--template", "first", "--workers", "1", *extra]


def _failed_lines(text):
    return [line for line in text.splitlines() if "FAILED" in line]


@pytest.mark.parametrize("case", FOLDER_IMAGES)
def test_preprocess_reports_a_bad_image_and_writes_nothing_for_it(case, tmp_path, monkeypatch,
                                                                  capsys):
    data_dir = write_dataset(tmp_path / "data", n=1)
    make, problem = BAD_IMAGES[case]
    bad = replace_file(os.path.join(data_dir, "images", "s0.nii.gz"), make)
    out = tmp_path / "out"
    code = run_main(preprocess, _preprocess_argv(data_dir, out, "--template", "mni152"),
                    monkeypatch)
    printed = capsys.readouterr().out
    assert code == 1, printed
    failed = _failed_lines(printed)
    assert len(failed) == 1 and bad in failed[0] and re.search(problem, failed[0]), printed
    assert files_under(out) == []


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_preprocess_reports_a_bad_label_map(case, tmp_path, monkeypatch, capsys):
    data_dir = write_dataset(tmp_path / "data", n=1)
    make, problem = BAD_LABELS[case]
    bad = replace_file(os.path.join(data_dir, "labels", "s0.nii.gz"), make)
    out = tmp_path / "out"
    code = run_main(preprocess, _preprocess_argv(data_dir, out, "--template", "mni152"),
                    monkeypatch)
    printed = capsys.readouterr().out
    assert code == 1, printed
    failed = _failed_lines(printed)
    assert len(failed) == 1 and bad in failed[0] and re.search(problem, failed[0]), printed
    assert files_under(out) == []


def test_preprocess_template_first_names_the_bad_subject(tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data", n=1)
    bad = replace_file(os.path.join(data_dir, "images", "s0.nii.gz"), _truncated)
    out = tmp_path / "out"
    code = run_main(preprocess, _preprocess_argv(data_dir, out), monkeypatch)
    assert_one_line_error(code, "preprocess", bad, "truncated or corrupt.*--template")
    assert files_under(out) == []


@pytest.mark.parametrize("case", ["truncated", "4d", "png", "directory", "missing"])
def test_preprocess_refuses_a_bad_template(case, tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data", n=1)
    make, problem = BAD_IMAGES[case]
    template = replace_file(tmp_path / "template.nii.gz", make)
    out = tmp_path / "out"
    code = run_main(preprocess, _preprocess_argv(data_dir, out, "--template", template),
                    monkeypatch)
    assert_one_line_error(code, "preprocess", template, problem)
    assert files_under(out) == []


def test_preprocess_refuses_missing_folders(tmp_path, monkeypatch):
    out = tmp_path / "out"
    code = run_main(preprocess, ["--images", tmp_path / "nope", "--labels", tmp_path,
                                 "--out", out], monkeypatch)
    assert_one_line_error(code, "preprocess", tmp_path / "nope", "no such directory")
    assert not out.exists()


def test_preprocess_refuses_an_unusable_output_folder(tmp_path, monkeypatch):
    data_dir = write_dataset(tmp_path / "data", n=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"
    code = run_main(preprocess, _preprocess_argv(data_dir, out), monkeypatch)
    assert_one_line_error(code, "preprocess", out, "cannot write outputs here.*not a directory")


@pytest.mark.parametrize("fail_at", [1, 2])
def test_preprocess_full_disk_leaves_no_half_done_subject(fail_at, tmp_path, monkeypatch,
                                                          capsys):
    """The labels are written first, the image last; a full disk at either leaves neither."""
    data_dir = write_dataset(tmp_path / "data", n=1)
    out = tmp_path / "out"
    disk = FullDisk(monkeypatch, fail_at=fail_at)
    code = run_main(preprocess, _preprocess_argv(data_dir, out), monkeypatch)
    printed = capsys.readouterr().out
    assert disk.calls >= fail_at
    assert code == 1, printed
    failed = _failed_lines(printed)
    assert len(failed) == 1 and re.search(r"s0\.nii\.gz: cannot write \(No space", failed[0]), \
        printed
    assert files_under(out) == []


# ------------------------------------------------------------------------------------------------
# Model directories: data only, validated, never executed
# ------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs `open(marker, 'w')`: the file appears if anything unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy_model(model_dir, dest):
    os.makedirs(dest)
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        with open(os.path.join(dest, name), "wb") as f:
            f.write(data)
    return str(dest)


def _edit_config(directory, edit):
    path = os.path.join(directory, registry.CONFIG_FILE)
    config = json.load(open(path))
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)  # NaN is written as the non-standard token NaN on purpose
    return path


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


#: name -> (edit of the config dict, regex of the problem)
TAMPERED_CONFIGS = {
    "unknown_model": (_set("name", "os.system"), r"unknown model 'os\.system'; available"),
    "class_field": (_set("__class__", "subprocess.Popen"), r"unexpected field.*__class__"),
    "module_field": (_set("module", "os"), r"unexpected field.*'module'"),
    "unknown_hparam": (_set("hparams", "__init__", "print"), r"unknown hyper-parameter.*__init__"),
    "hparam_code": (_set("hparams", "lam", {"class_name": "Lambda", "module": "os"}),
                    r"'lam'.*does not have the type.*plain JSON"),
    "hparam_str_for_int": (_set("hparams", "int_steps", "7"), r"'int_steps'.*type"),
    "hparam_bool_for_int": (_set("hparams", "int_steps", True), r"'int_steps'.*type"),
    "hparam_nan": (_set("hparams", "lam", float("nan")), r"'lam'.*finite"),
    "hparam_list_of_str": (_set("hparams", "enc_features", ["4", "8"]), r"'enc_features'.*type"),
    "shape_zero": (_set("input_shape", [0, 0, 0]), r"input_shape.*positive integers"),
    "shape_text": (_set("input_shape", ["a", 16, 16]), r"input_shape.*positive integers"),
    "shape_float": (_set("input_shape", [16.5, 16, 16]), r"input_shape.*positive integers"),
    "shape_4d": (_set("input_shape", [16, 16, 16, 16]), r"input_shape.*2 or 3"),
    "shape_huge": (_set("input_shape", [16000, 16000, 16000]), r"voxels, more than"),
    "shape_not_divisible": (_set("input_shape", [17, 16, 16]), r"divisible by 16"),
    "shape_dict": (_set("input_shape", {"x": 16}), r"'input_shape' missing or not a list"),
    "no_format": (lambda c: c.pop("format"), "not an mdregnet model config"),
    "extra_not_dict": (_set("extra", "rm -rf /"), r"'extra' is not a JSON object"),
}


@pytest.mark.parametrize("case", list(TAMPERED_CONFIGS))
def test_load_refuses_a_tampered_config(case, model_dir, tmp_path):
    directory = _copy_model(model_dir, tmp_path / "m")
    edit, problem = TAMPERED_CONFIGS[case]
    path = _edit_config(directory, edit)
    with pytest.raises(io.InvalidInputError, match=problem) as info:
        models.load(directory)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    # infer and evaluate read the config before any image; same error.
    with pytest.raises(io.InvalidInputError, match=problem):
        registry.read_config(directory)


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not a readable JSON model config"),
    (b"\xff\xfe\x00\x00binary", "not a readable JSON.*UnicodeDecodeError"),
    (b"[" * 100_000, "not a readable JSON"),  # nesting deep enough for a RecursionError
    (b"[1, 2, 3]", "not an mdregnet model config"),
    (b" " * (registry.MAX_CONFIG_BYTES + 1) + b"{}", "too large for a model config"),
], ids=["not_json", "binary", "deep_nesting", "a_list", "huge"])
def test_load_refuses_a_config_that_is_not_json(content, problem, model_dir, tmp_path):
    directory = _copy_model(model_dir, tmp_path / "m")
    path = os.path.join(directory, registry.CONFIG_FILE)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(io.InvalidInputError, match=problem) as info:
        models.load(directory)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("name", [registry.CONFIG_FILE, registry.WEIGHTS_FILE])
def test_load_never_unpickles(name, model_dir, tmp_path):
    directory = _copy_model(model_dir, tmp_path / "m")
    marker = tmp_path / "unpickled"
    with open(os.path.join(directory, name), "wb") as f:
        pickle.dump(Payload(str(marker)), f)
    with pytest.raises(io.InvalidInputError, match=re.escape(name)):
        models.load(directory)
    assert not marker.exists()


def _replace_weights(directory, edit):
    path = os.path.join(directory, registry.WEIGHTS_FILE)
    with h5py.File(path, "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        edit(f, sorted(names))
    return path


def _nan_weights(f, names):
    data = f[names[-1]][()]
    del f[names[-1]]
    f[names[-1]] = np.full_like(data, np.nan)


def _extra_array(f, names):
    f["layers/injected/vars/0"] = np.zeros(3, np.float32)


def _missing_array(f, names):
    del f[names[0]]


@pytest.mark.parametrize("edit, problem", [
    (_nan_weights, "holds NaN or Inf"),
    (_extra_array, r"holds 25 arrays.*24 variables.*weights of another architecture"),
    (_missing_array, r"holds 23 arrays.*24 variables"),
], ids=["nan", "extra_array", "missing_array"])
def test_load_refuses_weights_that_do_not_fit(edit, problem, model_dir, tmp_path):
    directory = _copy_model(model_dir, tmp_path / "m")
    path = _replace_weights(directory, edit)
    with pytest.raises(io.InvalidInputError, match=problem) as info:
        models.load(directory)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_load_refuses_weights_of_another_architecture(model_dir, tmp_path):
    # The config says enc_features [4, 8, 8, 8]; the weights come from [8, 8, 8, 8].
    directory = _copy_model(model_dir, tmp_path / "m")
    other = tmp_path / "other"
    models.save(models.build("voxelmorph", SHAPE, **dict(TINY, enc_features=[8, 8, 8, 8])),
                str(other))
    path = os.path.join(directory, registry.WEIGHTS_FILE)
    with open(other / registry.WEIGHTS_FILE, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(io.InvalidInputError,
                       match=r"24 variables \(shapes differ: .*\): weights of another "
                             r"architecture") as info:
        models.load(directory)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    # ... and a 2D model's weights for the 3D config: refused the same way.
    flat = tmp_path / "flat"
    models.save(models.build("voxelmorph", (16, 16), **TINY), str(flat))
    with open(flat / registry.WEIGHTS_FILE, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(io.InvalidInputError, match="weights of another architecture"):
        models.load(directory)


def test_load_refuses_weights_renamed_into_other_layers(model_dir, tmp_path):
    """Same arrays, same shapes, but under other layer names: Keras finds nothing for the
    model's layers and refuses (no silent fresh initialisation)."""
    directory = _copy_model(model_dir, tmp_path / "m")

    def rename(f, names):
        f.move("layers", "renamed_layers")

    path = _replace_weights(directory, rename)
    with pytest.raises(io.InvalidInputError, match="cannot load weights.*could not be loaded"):
        models.load(directory)
    assert os.path.isfile(path)


@pytest.mark.parametrize("case", ["truncated", "text", "directory", "missing"])
def test_load_refuses_a_broken_weights_file(case, model_dir, tmp_path):
    directory = _copy_model(model_dir, tmp_path / "m")
    path = os.path.join(directory, registry.WEIGHTS_FILE)
    if case == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:
        os.remove(path)
        if case == "text":
            open(path, "w").write("weights\n")
        elif case == "directory":
            os.makedirs(path)
    error = io.MissingFileError if case == "missing" else io.InvalidInputError
    with pytest.raises(error) as info:
        models.load(directory)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert {"truncated": "cannot load weights", "text": "cannot load weights",
            "directory": "not a regular file", "missing": "no such file"}[case] in message


def test_load_refuses_missing_model_folders(tmp_path):
    with pytest.raises(io.MissingFileError, match="no such model directory"):
        models.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such file"):
        models.load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(io.MissingFileError, match="not a directory"):
        models.load(tmp_path / "file")


@pytest.mark.parametrize("case", ["class_field", "unknown_model", "shape_huge"])
def test_infer_refuses_a_tampered_model_in_one_line(case, pair, model_dir, tmp_path, monkeypatch):
    directory = _copy_model(model_dir, tmp_path / "m")
    edit, problem = TAMPERED_CONFIGS[case]
    path = _edit_config(directory, edit)
    out = tmp_path / "out"
    code = run_main(infer, _infer_argv(pair, directory, out), monkeypatch)
    assert_one_line_error(code, "infer", path, problem)
    assert not out.exists()


def test_evaluate_refuses_weights_of_another_model_in_one_line(model_dir, tmp_path, monkeypatch):
    directory = _copy_model(model_dir, tmp_path / "m")
    path = _replace_weights(directory, _extra_array)
    data_dir = write_dataset(tmp_path / "data")
    out = tmp_path / "eval"
    code = run_main(evaluate, _evaluate_argv(data_dir, directory, out), monkeypatch)
    assert_one_line_error(code, "evaluate", path, "weights of another architecture")
    assert not out.exists()


@pytest.mark.parametrize("fail_at", [1, 2])
def test_save_full_disk_leaves_no_model_and_keeps_an_older_one(fail_at, model_dir, tmp_path,
                                                               monkeypatch):
    model = models.load(model_dir)
    new = tmp_path / "new"
    old = _copy_model(model_dir, tmp_path / "old")
    before = {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)}
    FullDisk(monkeypatch, fail_at=fail_at)
    with pytest.raises(OSError, match="No space left on device") as info:
        models.save(model, str(new))
    assert re.search(r"/new/(config\.json|model\.weights\.h5): cannot write", str(info.value))
    assert not new.exists()
    with pytest.raises(OSError, match="No space left on device"):
        models.save(model, old, extra={"run": 2})
    assert {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)} == before


def test_package_never_loads_models_through_pickle_or_unsafe_keras():
    """No `pickle`/`marshal`/`dill` import, no `keras...load_model` or `np.load` without
    `allow_pickle=False`, and no `safe_mode=False` anywhere in the package: `models.load` (JSON
    plus `.weights.h5`) is the only way a model comes in."""
    package = os.path.join(REPO, "mdregnet")
    problems = []
    for root, _, names in os.walk(package):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                where = f"{os.path.relpath(path, REPO)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    modules = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    if any(m.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle",
                                               "joblib", "shelve") for m in modules):
                        problems.append(f"{where}: imports {modules}")
                if isinstance(node, ast.Call):
                    func = node.func
                    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id",
                                                                                        "")
                    keywords = {k.arg: k.value for k in node.keywords}
                    if called == "load_model" and not (
                            isinstance(keywords.get("safe_mode"), ast.Constant)
                            and keywords["safe_mode"].value is True):
                        problems.append(f"{where}: load_model without safe_mode=True")
                    if isinstance(keywords.get("safe_mode"), ast.Constant) and \
                            keywords["safe_mode"].value is False:
                        problems.append(f"{where}: safe_mode=False")
                    if isinstance(keywords.get("allow_pickle"), ast.Constant) and \
                            keywords["allow_pickle"].value is True:
                        problems.append(f"{where}: allow_pickle=True")
    assert problems == []


# ------------------------------------------------------------------------------------------------
# Real processes: exit status and stderr of `python -m`
# ------------------------------------------------------------------------------------------------
def _python_m(module, argv):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", module] + [str(a) for a in argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=180)


def _last_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_subprocess_infer_truncated_moving(pair, model_dir, tmp_path):
    bad = replace_file(tmp_path / "in" / "cut.nii.gz", _truncated)
    out = tmp_path / "out"
    proc = _python_m("mdregnet.infer", _infer_argv(pair, model_dir, out, moving=bad))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_one_line_error(_last_line(proc), "infer", bad, "truncated or corrupt")
    assert not out.exists() and temporaries(tmp_path) == []


def test_subprocess_evaluate_nan_subject(model_dir, tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    bad = replace_file(os.path.join(data_dir, "images", "s2.nii.gz"), _with_voxel(np.nan))
    out = tmp_path / "eval"
    proc = _python_m("mdregnet.evaluate", _evaluate_argv(data_dir, model_dir, out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_one_line_error(_last_line(proc), "evaluate", bad, "NaN or Inf")
    assert not out.exists()


def test_subprocess_train_huge_header(tmp_path):
    data_dir = write_dataset(tmp_path / "data")
    bad = replace_file(os.path.join(data_dir, "images", "s0.nii.gz"), _huge)
    workdir = tmp_path / "run"
    proc = _python_m("mdregnet.train", _train_argv(data_dir, workdir))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_one_line_error(_last_line(proc), "train", bad, "4000x4000x4000")
    assert not workdir.exists()


def test_subprocess_preprocess_unwritable_out_and_bad_subject(tmp_path):
    data_dir = write_dataset(tmp_path / "data", n=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _python_m("mdregnet.preprocess", _preprocess_argv(data_dir, blocker / "out"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert_one_line_error(_last_line(proc), "preprocess", blocker / "out", "not a directory")
    # A bad subject: status 1 and its FAILED line on stdout.
    bad = replace_file(os.path.join(data_dir, "images", "s0.nii.gz"), _png)
    out = tmp_path / "out"
    proc = _python_m("mdregnet.preprocess",
                     _preprocess_argv(data_dir, out, "--template", "mni152"))
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    failed = _failed_lines(proc.stdout)
    assert len(failed) == 1 and bad in failed[0] and "not a readable NIfTI" in failed[0]
    assert files_under(out) == []
