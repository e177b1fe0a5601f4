"""Cohort-scale registration: every subject of a folder to one template, or one atlas to each.

Two modes of `python -m mdregnet.infer` (flags in `infer.define_flags`):

    # A. to a template: each subject of DIR is MOVING, the template FIXED
    python -m mdregnet.infer --fixed template.nii.gz --moving_dir DIR --out reg/ \
        [--labels_dir LABELS --fixed_labels template_seg.nii.gz] [--subjects ids.txt] \
        [--model M] [--batch_size 4] [--strategy mirrored] [--refine_steps N]
    # B. atlas propagation (atlas-based segmentation): the atlas is MOVING, each subject FIXED
    python -m mdregnet.infer --atlas atlas.nii.gz --atlas_labels atlas_seg.nii.gz \
        --subjects_dir DIR --out seg/ [--labels_dir LABELS] [--subjects ids.txt] ...

Python: `CohortRegistration(model, reference, ...).run(find_cohort(DIR, LABELS), out_dir)`, or
`register_to_template(...)` / `propagate_atlas(...)`.

Subjects (`find_cohort`): the `*.nii` / `*.nii.gz` images of DIR as `data.find_subjects` lists
them (id = file name without the extension; `--subjects` selects and orders ids); a subject's
label map in `--labels_dir` is matched by name as `data.find_subjects` does (`sub1` ->
`sub1.nii.gz`, `sub1_seg.nii.gz`, ...), and is optional per subject. Every subject must lie on
the template's (atlas') grid, as after `python -m mdregnet.preprocess`: the cohort is not
resampled. Each image is validated by `mdregnet.io` (readable, 3D, finite, not all zero; same
shape and affine as the reference), its label map too; intensities outside [0, 1] are min-max
normalised as `mdregnet.infer` does. A subject that fails any of this gets the CSV status
`failed: <one line naming the file>` and the others go on; the command then exits with status 1.

Data flow (CONVENTIONS.md). The model is loaded once (`infer.fit_model`: rebuilt for the grid,
or the images zero-padded to a multiple of its down-sampling factor and every output cropped
back). A `tf.data` pipeline reads and normalises the subjects in parallel (`num_parallel_calls`,
`prefetch`, fixed parallelism), yielding batches of `--batch_size` images `(B, X', Y', Z', 1)`
float32 on the padded grid (the last batch is filled up with empty slots, so every call has the
same shape and one traced `tf.function` serves the whole cohort). The reference image is tiled
to the batch and takes the fixed (A) or moving (B) slot of `model([moving, fixed])`; the call
returns, per subject, `disp` `(X, Y, Z, 3)` in voxels of the reference grid (`warped(p) =
moving(p + disp(p))`), the warped moving image and `det(I + grad disp)`. The moving label map
(A: the subject's; B: the atlas') is warped by nearest neighbour (`infer.warp_labels`). While
the next batch runs, a small thread pool computes each subject's numbers and writes its folder.

With `--refine_steps N` (> 0; diffeomorphic models), each subject's velocity field is then
refined by N Adam steps on the model's own loss (`mdregnet.refine`), one subject at a time.

Outputs in `--out`:
    <id>/warped.nii.gz         moving image warped onto the fixed grid (A: the subject; B: the
                               atlas on the subject)
    <id>/disp.nii.gz           displacement `(X, Y, Z, 3)`, voxels of the fixed grid
    <id>/jacobian_det.nii.gz   det(I + grad disp) (folding where <= 0)
    <id>/warped_labels.nii.gz  moving labels warped by nearest neighbour (A: the subject's, when
                               it has labels; B: the atlas labels = the subject's segmentation)
    <id>/summary.json          as `mdregnet.infer`'s: model, files, time, folding (grid and,
                               with fixed labels, their brain mask), SDlogJ, Dice (with labels on
                               both sides: A `--fixed_labels` and the subject's; B the subject's),
                               notes, refinement, and 'cohort' (the settings, for resuming)
    cohort.csv                 one row per subject of the run (`--subjects`), in its order: id,
                               status ('ok', 'skipped' = done by an earlier run, or 'failed:
                               ...'), time_s (seconds: the subject's share of its batch's model
                               call, the first batch's including the tracing, plus refinement),
                               folding_count, folding_percent, sdlogj, dice_mean (empty without
                               labels); rewritten (atomically) after every batch
All on the reference grid, with its affine and header; images and fields are NIfTI `.nii.gz`.

Resume. Each subject folder is written as `infer.register` writes its output folder: into a
temporary folder, then moved in with summary.json last, so a folder holding summary.json is
complete and an interrupted or failed subject leaves nothing. A rerun with the same settings
(mode, reference and its labels, model, refinement) skips every subject whose summary.json
exists and reads its CSV row back from it; a subject done with other settings is redone. Delete
a subject's folder to redo it.

Progress: one line per batch, `cohort: done/total subjects (ok, failed, skipped) rate ETA`; the
rate leaves out the first batch, which traces the model.

Several GPUs (`--strategy mirrored`, `tf.distribute.MirroredStrategy`, `train.get_strategy`): the
model is built under the strategy's scope on every visible GPU, the dataset is distributed with
`strategy.experimental_distribute_dataset`, and each global batch of `--batch_size` subjects
(rounded up to a multiple of the number of GPUs) is split across them by `strategy.run`:

    CUDA_VISIBLE_DEVICES=0,1,2,3 python -m mdregnet.infer --strategy mirrored --batch_size 8 \
        --device gpu --atlas A --atlas_labels L --subjects_dir DIR --out seg/

one process, 2 subjects per GPU per call. On a CPU, 'mirrored' is one replica (the CPU) unless
TensorFlow's CPU is split into logical devices first (`tf.config.set_logical_device_
configuration`, as the tests do).

Several hosts (`--strategy multi_worker`, `tf.distribute.MultiWorkerMirroredStrategy`, the
cluster in `TF_CONFIG` as for training): the same command on every host, with the same folders
(`--out` on storage every host sees). The subjects still to do are listed by every worker,
checked to be the same list (an all-reduce of a fingerprint), and split by position: worker w of
W takes subjects w, w + W, w + 2W, ... Each worker runs its own input pipeline and model call on
its local device (one worker per GPU: give each process its `CUDA_VISIBLE_DEVICES`), writes its
subjects' folders, and takes no part in the others' calls (inference has nothing to
synchronise). At the end the workers meet (an all-reduce) and the chief writes cohort.csv with
every worker's rows, which the others leave in the output folder (`.cohort-rows-worker<w>.json`,
removed by the chief). A worker lost on the way stops the others at that meeting (status 75, as
in training); the rerun skips every subject whose folder is complete.

    # on each of 2 hosts, "index" 0 and 1
    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}' \
        python -m mdregnet.infer --strategy multi_worker --batch_size 4 --fixed T --moving_dir DIR --out /shared/reg

Throughput: `experiments/benchmark_cohort.py` prints subjects/s per batch size (model loading and
the first call's tracing excluded).
"""

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import time
from io import StringIO
from typing import List

import numpy as np
import tensorflow as tf
from absl import app

from mdregnet import data, infer, io, metrics, models, refine, train

TO_TEMPLATE = "to_template"
ATLAS = "atlas"
MODES = (TO_TEMPLATE, ATLAS)
#: The `tf.distribute` strategies this command takes (`train.get_strategy` names).
STRATEGIES = ("default", "mirrored", "multi_worker")
#: Rows of a non-chief worker, handed to the chief through the output folder at the end.
_WORKER_ROWS = ".cohort-rows-worker{}.json"
#: The files of a subject folder (warped_labels.nii.gz only with labels to warp).
COHORT_FILES = ("warped.nii.gz", "disp.nii.gz", "jacobian_det.nii.gz", "warped_labels.nii.gz",
                "summary.json")
CSV_NAME = "cohort.csv"
CSV_COLUMNS = ("id", "status", "time_s", "folding_count", "folding_percent", "sdlogj",
               "dice_mean")


# ------------------------------------------------------------------------------------------------
# Subjects
# ------------------------------------------------------------------------------------------------
def find_cohort(image_dir, labels_dir=None, subjects=None):
    """The subjects of `image_dir`, each with its label map in `labels_dir` when it has one.

    Args:
        image_dir: folder of `*.nii` / `*.nii.gz` images (hidden files ignored).
        labels_dir: optional folder of label maps, matched to ids by name as
            `data.find_subjects` does; unlike there, a subject without one is kept (labels None).
        subjects: None (every image, sorted), a list of ids, or a text file of ids (one a line,
            `#` comments), as `data.find_subjects`.

    Returns:
        list of `data.Subject` (id, image path, labels path or None).

    Raises:
        io.InvalidInputError: missing folders or no images, unknown or repeated ids, a label
            folder that is the image folder, or several label files matching one subject.
    """
    found = data.find_subjects(image_dir, subjects=subjects)
    if labels_dir is None:
        return found
    labels_dir = os.fspath(labels_dir)
    if not os.path.isdir(labels_dir):
        raise io.MissingFileError(f"{labels_dir}: no such directory")
    if os.path.realpath(labels_dir) == os.path.realpath(os.fspath(image_dir)):
        raise io.InvalidInputError(f"{labels_dir}: the label folder is the image folder")
    label_files = data._nifti_files(labels_dir)
    for subject in found:
        subject.labels = data._match_label(subject.id, label_files, labels_dir, None)
    return found


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CohortReport:
    """What `CohortRegistration.run` did.

    Attributes:
        rows: one dict per subject with a result, in subject order, keys `CSV_COLUMNS`.
        out_dir: the output folder; csv_path: its cohort.csv.
        seconds: wall time of the registration loop (from the first batch to the last write;
            includes the first call's tracing unless `warm_up` was called).
        processed: subjects registered or failed by this run (skipped ones not counted).
    """

    rows: List[dict]
    out_dir: str
    csv_path: str
    seconds: float = 0.0
    processed: int = 0

    def _count(self, prefix):
        return sum(1 for row in self.rows if row["status"].startswith(prefix))

    @property
    def n_ok(self):
        return self._count("ok")

    @property
    def n_skipped(self):
        return self._count("skipped")

    @property
    def n_failed(self):
        return self._count("failed")

    @property
    def failed(self):
        """The rows whose status starts with 'failed'."""
        return [row for row in self.rows if row["status"].startswith("failed")]

    @property
    def rate(self):
        """Subjects per second of this run (`processed / seconds`), NaN when nothing ran."""
        return self.processed / self.seconds if self.processed and self.seconds > 0 else math.nan


def _write_json_file(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def _csv_text(rows):
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        values = []
        for key in CSV_COLUMNS:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                value = ""
            elif isinstance(value, float):
                value = f"{value:.6g}"
            values.append(value)
        writer.writerow(values)
    return buffer.getvalue()


def write_csv(path, rows):
    """Writes `rows` (dicts with `CSV_COLUMNS`) as CSV, atomically (`io.atomic_write`)."""
    text = _csv_text(rows)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    io.atomic_write(path, write)


def _row(subject_id, status, summary=None):
    summary = summary or {}
    fold = summary.get("folding") or {}
    dice = summary.get("dice") or {}
    return {"id": subject_id, "status": status, "time_s": summary.get("time_s"),
            "folding_count": fold.get("count"), "folding_percent": fold.get("percent"),
            "sdlogj": summary.get("sdlogj"), "dice_mean": dice.get("mean")}


def _one_line(err, path, *other_paths):
    """`err` as one line naming a file: as it is when it names `path` or one of `other_paths`
    (io's messages start with the offending file), else prefixed with `path`."""
    text = " ".join(str(err).split())
    if not any(p and p in text for p in (path,) + other_paths):
        text = f"{path}: {type(err).__name__}: {text}" if text else f"{path}: {type(err).__name__}"
    return text


def _read_summary(folder):
    """The summary.json of a finished subject folder, or None (missing or unreadable)."""
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _format_eta(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
class CohortRegistration:
    """A model, a reference image and a compiled batch step, reused for any number of subjects.

    Args:
        model: a saved model directory (`models.save`) or a model from `models.build`/`load`;
            loaded (or copied) once, under the strategy's scope, for the reference grid.
        reference: NIfTI path of the template (mode 'to_template': the FIXED image) or of the
            atlas (mode 'atlas': the MOVING image). Its grid is every output's.
        reference_labels: label map on the reference grid: the template's (optional; Dice and
            the brain mask for folding) or the atlas' (required; warped onto each subject).
        mode: 'to_template' or 'atlas' (module doc).
        batch_size: subjects per model call (global: split over the replicas; rounded up to a
            multiple of their number).
        strategy: 'default' or 'mirrored' (`train.get_strategy`), or a `tf.distribute.Strategy`.
        refine_steps: test-time refinement steps per subject (`mdregnet.refine`); 0 = off.
        refine_lr: the refinement's Adam step size (None: `refine.DEFAULT_LR`).
        workers: threads that compute metrics and write subject folders (default: the batch
            size, at most the number of CPUs).

    Raises:
        io.InvalidInputError: an unreadable reference or reference labels, or labels on
            another grid.
        ValueError: a bad mode, strategy or batch size, atlas mode without atlas labels, a model
            that cannot take the grid, or refinement of a model without a velocity field.
    """

    def __init__(self, model, reference, reference_labels=None, mode=TO_TEMPLATE, batch_size=1,
                 strategy="default", refine_steps=0, refine_lr=None, workers=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == ATLAS and reference_labels is None:
            raise ValueError("atlas propagation needs the atlas label map (reference_labels)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(refine_steps) < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
            strategy = train.get_strategy(strategy)
        self.multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.is_chief, self.worker, self.num_workers = True, 0, 1
        self.cluster = None
        if self.multi_worker:
            # The cluster strategy gives the worker's place and the meetings (all-reduces); each
            # worker registers its own subjects with a local model (its variables are not
            # mirrored across workers: inference has nothing to synchronise).
            self.cluster, strategy = strategy, tf.distribute.get_strategy()
            self.is_chief, task_id = train._worker(self.cluster)
            spec = self.cluster.cluster_resolver.cluster_spec().as_dict()
            task_type = self.cluster.cluster_resolver.task_type
            self.num_workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
            self.worker = task_id + (len(spec.get("chief", [])) if task_type == "worker" else 0)
        self.strategy = strategy
        self.mode = mode
        self.refine_steps = int(refine_steps)
        self.refine_lr = refine_lr
        self.notes = []

        self.reference_path = os.fspath(reference)
        image, self.reference_img = io.load_image(self.reference_path)
        self.shape = tuple(int(n) for n in image.shape)
        role = "fixed" if mode == TO_TEMPLATE else "moving"
        image, self.reference_normalised = infer._to_unit_range(image, f"{role} (reference)",
                                                                self.notes)
        self.reference_labels_path = None
        self.reference_labels = None
        if reference_labels is not None:
            self.reference_labels_path = os.fspath(reference_labels)
            labels, labels_img = io.load_labels(self.reference_labels_path)
            io.check_same_grid(self.reference_img, self.reference_path, labels_img,
                               self.reference_labels_path)
            self.reference_labels = labels

        self.source_config, self.source_dir = infer.model_config(model)
        default = strategy is tf.distribute.get_strategy()
        with strategy.scope():
            fitted, self.pad, note = infer.fit_model(model, self.shape)
            if fitted is model and not default:  # variables must be created under the scope
                config = model.mdregnet_config
                fitted = models.build(config["name"], tuple(config["input_shape"]),
                                      **config["hparams"])
                fitted.set_weights(model.get_weights())
        if note:
            self.notes.append(note)
        if self.refine_steps and "velocity" not in fitted.output:
            raise ValueError(f"refine_steps > 0 needs a model with a velocity field; "
                             f"{fitted.mdregnet_config['name']!r} has none")
        self.model = fitted
        self.padded_shape = tuple(int(n) for n in fitted.mdregnet_config["input_shape"])
        self.replicas = int(strategy.num_replicas_in_sync)
        self.batch_size = int(math.ceil(int(batch_size) / self.replicas)) * self.replicas
        if self.batch_size != int(batch_size):
            self.notes.append(f"batch size {batch_size} rounded up to {self.batch_size}, a "
                              f"multiple of the {self.replicas} replicas")
        self.workers = int(workers or max(1, min(self.batch_size, os.cpu_count() or 1)))
        self.device = infer._device_name()
        padded = infer.pad_volume(image, self.pad)
        self._reference = tf.constant(padded[..., None], tf.float32)
        self._step = self._build_step()

    # -- the batch step ---------------------------------------------------------------------------
    def _build_step(self):
        model, strategy, reference = self.model, self.strategy, self._reference
        crop = (slice(None),) + tuple(slice(b, b + n) for (b, _), n in zip(self.pad, self.shape))
        to_template, with_velocity = self.mode == TO_TEMPLATE, self.refine_steps > 0

        def replica_step(batch):
            images = batch["image"]
            tiled = tf.tile(reference[None], [tf.shape(images)[0], 1, 1, 1, 1])
            moving, fixed = (images, tiled) if to_template else (tiled, images)
            out = model([moving, fixed], training=False)
            disp = out["disp"][crop]
            result = {"index": batch["index"], "disp": disp, "warped": out["warped"][crop][..., 0],
                      "jac": metrics.jacobian_determinant_tf(disp)}
            if with_velocity:
                result["velocity"] = out["velocity"]
                result["padded_disp"] = out["disp"]
            return result

        @tf.function
        def step(batch):
            return strategy.run(replica_step, args=(batch,))

        return step

    def _local(self, value):
        """Numpy arrays of a per-replica structure, the replicas' batches concatenated."""
        return {key: np.concatenate([np.asarray(part) for part in
                                     self.strategy.experimental_local_results(tensor)], axis=0)
                for key, tensor in value.items()}

    # -- the input pipeline -----------------------------------------------------------------------
    def _dataset(self, subjects, info):
        """Distributed dataset of {'index' (B,) int32, 'image' (B, *padded, 1) float32}.

        Slots past the last subject have index -1 and a zero image; a subject whose files fail
        validation gets a zero image and `info[index]['error']`. Label maps and notes are kept
        on the host in `info[index]` (the loader runs in tf.data's threads).
        """
        n = len(subjects)
        total = int(math.ceil(n / self.batch_size)) * self.batch_size
        indices = np.array(list(range(n)) + [-1] * (total - n), np.int32)
        paths = [s.image for s in subjects] + [""] * (total - n)
        label_paths = [s.labels or "" for s in subjects] + [""] * (total - n)
        role = "moving" if self.mode == TO_TEMPLATE else "fixed"
        shape = self.padded_shape + (1,)

        def load(index, path, label_path):
            index = int(index)
            image = np.zeros(shape, np.float32)
            if index < 0:
                return image
            path, label_path = path.decode("utf-8"), label_path.decode("utf-8")
            try:
                volume, img = io.load_image(path)
                io.check_same_grid(self.reference_img, self.reference_path, img, path)
                notes = []
                volume, normalised = infer._to_unit_range(volume, role, notes)
                labels = None
                if label_path:
                    labels, labels_img = io.load_labels(label_path)
                    io.check_same_grid(img, path, labels_img, label_path)
                image[..., 0] = infer.pad_volume(volume, self.pad)
                info[index] = {"error": None, "labels": labels, "normalised": normalised,
                               "notes": notes}
            except Exception as err:  # reported as the subject's failure, the cohort goes on
                image[...] = 0.0
                info[index] = {"error": _one_line(err, path, label_path)}
            return image

        def load_element(index, path, label_path):
            image = tf.numpy_function(load, [index, path, label_path], tf.float32)
            return {"index": index, "image": tf.ensure_shape(image, shape)}

        ds = tf.data.Dataset.from_tensor_slices((indices, paths, label_paths))
        ds = ds.map(load_element, num_parallel_calls=self.workers, deterministic=True)
        return self._distribute(ds)

    def _distribute(self, ds):
        """Batches a dataset of single elements and distributes it: each batch split over the
        replicas by `experimental_distribute_dataset`."""
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.OFF
        # Fixed parallelism (`self.workers` readers, one batch ahead) instead of AUTOTUNE: with
        # autotuning on, destroying the exhausted iterator waited ~2 s for tf.data's autotuning
        # thread at the end of about every other run (seen with py-spy; the model call is the
        # bottleneck, so autotuning had nothing to gain).
        options.autotune.enabled = False
        ds = ds.batch(self.batch_size, drop_remainder=True).prefetch(1)
        return self.strategy.experimental_distribute_dataset(ds.with_options(options))

    def _all_reduce_sum(self, value):
        """The sum over every replica of the cluster of `value` (a float), and a meeting point:
        it returns only when every worker has called it (or raises when one is gone)."""
        local = len(self.cluster.extended.worker_devices)
        per_replica = self.cluster.run(tf.function(lambda: tf.constant(value / local, tf.float32)))
        return float(self.cluster.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    def warm_up(self):
        """Traces and compiles the batch step (and the label warp) on an empty batch.

        `run` does this on its first batch anyway; call it first to time `run` without it.
        """
        element = {"index": np.int32(-1),
                   "image": np.zeros(self.padded_shape + (1,), np.float32)}
        ds = tf.data.Dataset.from_tensors(element).repeat(self.batch_size)
        for dist_batch in self._distribute(ds):
            self._local(self._step(dist_batch))
        infer.warp_labels(np.zeros(self.shape, np.int32), np.zeros(self.shape + (3,), np.float32))

    # -- one subject ------------------------------------------------------------------------------
    def settings(self):
        """What a finished subject must have been registered with to be skipped (JSON types)."""
        return infer.jsonable({
            "mode": self.mode,
            "reference": os.path.abspath(self.reference_path),
            "reference_labels": (None if self.reference_labels_path is None
                                 else os.path.abspath(self.reference_labels_path)),
            "model": (os.path.abspath(self.source_dir) if self.source_dir is not None
                      else f"in-memory {self.source_config['name']}"),
            "refine_steps": self.refine_steps,
            "refine_lr": self.refine_lr if self.refine_steps else None,
        })

    def _finish(self, subject, meta, volumes, time_s, refine_info, out_dir):
        """Metrics and files of one registered subject (runs in a worker thread)."""
        started = time.perf_counter() - time_s
        if self.mode == TO_TEMPLATE:
            moving, fixed = subject.image, self.reference_path
            moving_labels, moving_labels_path = meta["labels"], subject.labels
            fixed_labels, fixed_labels_path = self.reference_labels, self.reference_labels_path
            normalised = {"moving": meta["normalised"], "fixed": self.reference_normalised}
        else:
            moving, fixed = self.reference_path, subject.image
            moving_labels, moving_labels_path = self.reference_labels, self.reference_labels_path
            fixed_labels, fixed_labels_path = meta["labels"], subject.labels
            normalised = {"moving": self.reference_normalised, "fixed": meta["normalised"]}
        disp = volumes["disp"]
        brain = (None if fixed_labels is None or not np.any(fixed_labels > 0)
                 else fixed_labels > 0)
        stats, jac = infer.deformation_stats(disp, mask=brain, jac=volumes.get("jac"))
        files = {"warped": volumes["warped"], "disp": disp, "jacobian_det": jac}
        dice = None
        if moving_labels is not None:
            files["warped_labels"] = infer.warp_labels(moving_labels, disp)
            if fixed_labels is not None:
                dice = infer.dice_summary(fixed_labels, moving_labels, files["warped_labels"])
        config = self.model.mdregnet_config
        summary = {
            "id": subject.id,
            "mode": self.mode,
            "model": {"name": config["name"], "directory": self.source_dir,
                      "saved_input_shape": self.source_config["input_shape"],
                      "input_shape": config["input_shape"], "hparams": config["hparams"]},
            "moving": moving, "fixed": fixed,
            "moving_labels": moving_labels_path, "fixed_labels": fixed_labels_path,
            "shape": list(self.shape),
            "voxel_size_mm": [float(z) for z in self.reference_img.header.get_zooms()[:3]],
            "device": self.device,
            "time_s": time_s,
            "batch_size": self.batch_size,
            "replicas": self.replicas,
            **stats,
            "normalised": normalised,
            "padding": (None if not any(b or a for b, a in self.pad)
                        else [list(p) for p in self.pad]),
            "notes": self.notes + meta["notes"],
            "dice": dice,
            "refine": refine_info,
            "cohort": self.settings(),
        }
        return infer.write_outputs(os.path.join(out_dir, subject.id), files, self.reference_img,
                                   summary, files=COHORT_FILES, started=started)

    def _refine(self, local, j, image):
        """Refines subject slot `j` of a batch (`image` `(*padded, 1)`, the subject's); returns
        `(volumes, seconds, info)`."""
        reference = self._reference.numpy()[None]  # (1, *padded, 1)
        moving, fixed = ((image[None], reference) if self.mode == TO_TEMPLATE
                         else (reference, image[None]))
        outputs = {"velocity": local["velocity"][j:j + 1], "disp": local["padded_disp"][j:j + 1]}
        refined, info = refine.refine(self.model, moving, fixed, self.refine_steps,
                                      lr=self.refine_lr, outputs=outputs)
        volumes = {"disp": infer.crop_volume(np.asarray(refined["disp"])[0], self.pad),
                   "warped": infer.crop_volume(np.asarray(refined["warped"])[0, ..., 0],
                                               self.pad)}
        summary = {key: info[key] for key in ("steps", "seconds", "loss_before", "loss_after",
                                              "lr")}
        return volumes, info["seconds"], summary

    # -- the cohort -------------------------------------------------------------------------------
    def run(self, subjects, out_dir, log=None):
        """Registers `subjects` and writes `out_dir` (module doc); resumes an earlier run.

        Args:
            subjects: list of `data.Subject` (e.g. `find_cohort`); ids must be unique.
            out_dir: output folder (created).
            log: callable taking one line (default: `print`, flushed).

        Returns:
            `CohortReport`; `n_failed > 0` when a subject failed (its row says why).

        Raises:
            ValueError: repeated subject ids.
            OSError: an output cannot be written (disk full, permissions): the run stops. Any
                exception or interruption leaves every subject folder complete or absent and
                cohort.csv listing what was finished.
        """
        if log is None:
            def log(line):
                print(line, flush=True)
        subjects = list(subjects)
        ids = [s.id for s in subjects]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"repeated subject ids: {repeated}")
        out_dir = os.path.abspath(os.fspath(out_dir))
        os.makedirs(out_dir, exist_ok=True)
        csv_path = os.path.join(out_dir, CSV_NAME)
        settings = self.settings()
        rows, todo, changed = {}, [], 0
        for subject in subjects:
            summary = _read_summary(os.path.join(out_dir, subject.id))
            if summary is not None and summary.get("cohort") == settings:
                rows[subject.id] = _row(subject.id, "skipped", summary)
            else:
                changed += summary is not None
                todo.append(subject)
        report = CohortReport(rows=[], out_dir=out_dir, csv_path=csv_path)

        def flush():
            report.rows = [rows[i] for i in ids if i in rows]
            if self.is_chief:
                write_csv(csv_path, report.rows)

        for note in self.notes:
            log(f"note: {note}")
        if rows:
            log(f"cohort: {len(rows)} of {len(subjects)} subjects already done in {out_dir} "
                "(skipped)")
        if changed:
            log(f"cohort: {changed} subjects of {out_dir} were registered with other settings "
                f"and are redone")
        if self.multi_worker:
            todo = self._share(todo, ids, rows, out_dir, log)
        flush()
        if not todo:
            return self._gather(report, rows, ids, out_dir, csv_path)

        info = {}
        dataset = self._dataset(todo, info)
        total, done_before = len(subjects), len(rows)
        counts = {"ok": 0, "failed": 0}
        pending = []
        timing = {"start": time.perf_counter(), "first": None, "first_count": 0}

        def collect():
            """Waits for the pending subjects; returns the first non-input error, if any."""
            error = None
            for subject, future in pending:
                try:
                    summary = future.result()
                except ValueError as err:  # io.InvalidInputError included
                    rows[subject.id] = _row(subject.id, "failed: " + _one_line(err,
                                                                                subject.image))
                    counts["failed"] += 1
                except BaseException as err:  # disk full, interruption: stop after the others
                    error = error or err
                else:
                    rows[subject.id] = _row(subject.id, "ok", summary)
                    counts["ok"] += 1
            n_batch = len(pending)
            pending.clear()
            return error, n_batch

        def progress():
            # The rate leaves out what was done by the first line (the first call traces).
            now = time.perf_counter()
            processed = counts["ok"] + counts["failed"]
            if timing["first"] is None:
                timing["first"], timing["first_count"] = now, processed
                rate = processed / max(now - timing["start"], 1e-9)
            else:
                rate = (processed - timing["first_count"]) / max(now - timing["first"], 1e-9)
            left = len(todo) - processed
            eta = _format_eta(left / rate) if rate > 0 else "?"
            log(f"cohort: {done_before + processed}/{total} subjects ({counts['ok']} ok, "
                f"{counts['failed']} failed, {done_before} skipped)  {rate:.3g} subjects/s  "
                f"ETA {eta}")

        executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers,
                                                         thread_name_prefix="mdregnet-cohort")
        try:
            for dist_batch in dataset:
                start = time.perf_counter()
                local = self._local(self._step(dist_batch))
                seconds = time.perf_counter() - start
                images = (self._local({"image": dist_batch["image"]})["image"]
                          if self.refine_steps else None)
                slots = [(j, int(i)) for j, i in enumerate(local["index"]) if i >= 0]
                share = seconds / max(1, len(slots))
                error, n_batch = collect()  # the previous batch, written while this one ran
                if n_batch:
                    flush()
                    progress()
                if error is not None:
                    raise error
                n_failed = 0
                for j, i in slots:
                    subject, meta = todo[i], info.pop(i)
                    if meta["error"] is not None:
                        rows[subject.id] = _row(subject.id, "failed: " + meta["error"])
                        counts["failed"] += 1
                        n_failed += 1
                        continue
                    time_s, refine_info = share, None
                    if self.refine_steps:
                        try:
                            volumes, extra, refine_info = self._refine(local, j, images[j])
                        except ValueError as err:
                            rows[subject.id] = _row(subject.id, "failed: " + _one_line(
                                err, subject.image))
                            counts["failed"] += 1
                            n_failed += 1
                            continue
                        time_s += extra
                    else:
                        volumes = {key: local[key][j] for key in ("disp", "warped", "jac")}
                    pending.append((subject, executor.submit(
                        self._finish, subject, meta, volumes, time_s, refine_info, out_dir)))
                if not pending and n_failed:  # a batch of failures only: report it now
                    flush()
                    progress()
            error, n_batch = collect()
            if n_batch:
                flush()
                progress()
            if error is not None:
                raise error
        except BaseException:
            collect()  # every submitted subject ends complete or absent
            flush()
            raise
        finally:
            executor.shutdown(wait=True)
            report.seconds = time.perf_counter() - timing["start"]
            report.processed = counts["ok"] + counts["failed"]
        return self._gather(report, rows, ids, out_dir, csv_path)

    # -- several workers --------------------------------------------------------------------------
    def _share(self, todo, ids, rows, out_dir, log):
        """This worker's subjects of `todo` (every worker's list checked to be the same)."""
        import zlib

        fingerprint = float(zlib.crc32("\n".join(s.id for s in todo).encode()) % (1 << 20))
        total = self._all_reduce_sum(fingerprint)
        if total != fingerprint * self.num_workers:
            raise ValueError(f"worker {self.worker}: the workers see different subjects to do "
                               f"in {out_dir} (another run writing there, or different "
                               "--subjects/folders on the hosts)")
        mine = todo[self.worker::self.num_workers]
        log(f"cohort: worker {self.worker} of {self.num_workers} takes {len(mine)} of the "
            f"{len(todo)} subjects to do")
        return mine

    def _gather(self, report, rows, ids, out_dir, csv_path):
        """Multi-worker: hands this worker's rows to the chief, meets the others, and (chief)
        writes cohort.csv with every row. Single worker: returns `report` unchanged."""
        if not self.multi_worker:
            return report
        if not self.is_chief:
            path = os.path.join(out_dir, _WORKER_ROWS.format(self.worker))
            io.atomic_write(path, lambda tmp: _write_json_file(tmp, list(rows.values())))
        self._all_reduce_sum(1.0)  # every worker has written its subjects and rows
        if self.is_chief:
            for worker in range(self.num_workers):
                path = os.path.join(out_dir, _WORKER_ROWS.format(worker))
                if worker == self.worker or not os.path.exists(path):
                    continue
                with open(path, encoding="utf-8") as f:
                    for row in json.load(f):
                        if row["id"] in ids and not (row["status"] == "skipped"
                                                     and row["id"] in rows):
                            rows[row["id"]] = row
                os.remove(path)
            report.rows = [rows[i] for i in ids if i in rows]
            write_csv(csv_path, report.rows)
        return report


def register_to_template(model, fixed, subjects, out_dir, fixed_labels=None, **kwargs):
    """Mode A: registers every subject (MOVING) to the template `fixed`; see the module doc.

    `subjects` as for `CohortRegistration.run`; `kwargs` go to `CohortRegistration` (batch_size,
    strategy, refine_steps, refine_lr, workers) and `log` to `run`. Returns a `CohortReport`.
    """
    log = kwargs.pop("log", None)
    registration = CohortRegistration(model, fixed, fixed_labels, mode=TO_TEMPLATE, **kwargs)
    return registration.run(subjects, out_dir, log=log)


def propagate_atlas(model, atlas, atlas_labels, subjects, out_dir, **kwargs):
    """Mode B: registers the atlas (MOVING) to every subject (FIXED) and warps its labels onto
    each; see the module doc. Arguments as `register_to_template`; returns a `CohortReport`."""
    log = kwargs.pop("log", None)
    registration = CohortRegistration(model, atlas, atlas_labels, mode=ATLAS, **kwargs)
    return registration.run(subjects, out_dir, log=log)


# ------------------------------------------------------------------------------------------------
# Command line (flags defined by mdregnet.infer.define_flags)
# ------------------------------------------------------------------------------------------------
#: Flags that select cohort mode.
MODE_FLAGS = ("moving_dir", "subjects_dir", "atlas", "atlas_labels")
#: Flags that only cohort mode takes.
COHORT_ONLY_FLAGS = MODE_FLAGS + ("labels_dir", "subjects", "batch_size", "strategy")


def requested(fv):
    """Whether the parsed flags `fv` ask for cohort mode."""
    return any(fv[name].value for name in MODE_FLAGS)


def run_from_flags(fv):
    """The cohort command line's work (flags of `infer.define_flags`); returns a CohortReport.

    Raises:
        app.UsageError: contradictory or missing flags.
        io.InvalidInputError / OSError / ValueError: as `find_cohort` and `CohortRegistration`.
    """
    if fv.moving_dir and fv.subjects_dir:
        raise app.UsageError("give --moving_dir (registration to --fixed) or --subjects_dir "
                             "(propagation of --atlas_labels), not both")
    if fv.moving_dir:
        if not fv.fixed:
            raise app.UsageError("--moving_dir needs --fixed (the template)")
        if fv.atlas or fv.atlas_labels:
            raise app.UsageError("--atlas/--atlas_labels go with --subjects_dir, not --moving_dir")
        mode, image_dir, reference, reference_labels = (TO_TEMPLATE, fv.moving_dir, fv.fixed,
                                                        fv.fixed_labels)
    elif fv.subjects_dir:
        if not (fv.atlas and fv.atlas_labels):
            raise app.UsageError("--subjects_dir needs --atlas and --atlas_labels")
        if fv.fixed or fv.fixed_labels:
            raise app.UsageError("--fixed/--fixed_labels go with --moving_dir; with "
                                 "--subjects_dir the subjects are the fixed images")
        mode, image_dir, reference, reference_labels = (ATLAS, fv.subjects_dir, fv.atlas,
                                                        fv.atlas_labels)
    else:
        raise app.UsageError("--atlas/--atlas_labels need --subjects_dir (the subjects to "
                             "segment)")
    for name in ("moving", "moving_labels", "moving_mask", "fixed_mask"):
        if fv[name].value:
            raise app.UsageError(f"--{name} is for one pair; cohort mode takes the subjects from "
                                 f"--{'moving_dir' if mode == TO_TEMPLATE else 'subjects_dir'}")
    if fv.preprocess:
        raise app.UsageError("--preprocess is for one pair: preprocess the cohort first "
                             "(python -m mdregnet.preprocess, onto the template grid)")
    if mode == TO_TEMPLATE and fv.labels_dir and not fv.fixed_labels:
        print("note: Dice needs --fixed_labels too; warping the subjects' labels only")
    infer.set_device(fv.device)
    # MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
    strategy = train.get_strategy(fv.strategy) if fv.strategy == "multi_worker" else fv.strategy
    model_dir = fv.model or infer.default_model_dir()
    subjects = find_cohort(image_dir, fv.labels_dir, fv.subjects)
    out = fv.out or "mdregnet_out"
    io.check_output_dir(out)  # before the model is built and the first batch runs
    with_labels = sum(1 for s in subjects if s.labels)
    what = (f"registration to {reference}" if mode == TO_TEMPLATE
            else f"propagation of {reference_labels}")
    print(f"cohort {what}: {len(subjects)} subjects in {image_dir}"
          + (f", {with_labels} with labels in {fv.labels_dir}" if fv.labels_dir else ""),
          flush=True)
    registration = CohortRegistration(model_dir, reference, reference_labels, mode=mode,
                                      batch_size=fv.batch_size, strategy=strategy,
                                      refine_steps=fv.refine_steps, refine_lr=fv.refine_lr)
    report = registration.run(subjects, out)
    print(f"cohort: {report.n_ok} registered, {report.n_skipped} skipped (done earlier), "
          f"{report.n_failed} failed; {report.processed} subjects in {report.seconds:.1f} s; "
          f"per-subject folders and {report.csv_path}")
    for row in report.failed:
        print(f"  {row['id']}: {row['status']}")
    return report
