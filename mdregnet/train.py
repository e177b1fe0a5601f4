"""Training of a registration model on image pairs, `python -m mdregnet.train`.

    python -m mdregnet.train --model mdregnet --data_dir work_data/ixi_2mm \
        --train_subjects train.txt --val_subjects val.txt --steps 150000 --workdir runs/mdregnet

Protocol (MDReg-Net, "Network Training"): every ordered pair of training images, identical pairs
included (n^2 pairs), is drawn at random, batch 1, Adam with learning rate 1e-4, 150,000 steps; the
objective is the method's own (`models.objective`: for MDReg-Net the bidirectional local NCC at
every level plus lambda times the gradient of each level's velocity, lambda = 0.35).

`data_dir` is a preprocessed dataset: `images/<id>.nii.gz` and optionally `labels/<id>.nii.gz`, all
on one grid, intensities in [0, 1] (`mdregnet.preprocess`). The grid's sizes must be divisible by
the model's total down-sampling factor (16 for MDReg-Net), or `--input_shape` centre-crops/pads.

Outputs in `--workdir` (each file written atomically):
    ckpt/         `tf.train.Checkpoint` (model, optimizer, step), the last 3 kept, written every
                  `--checkpoint_every` steps, at the end and on SIGINT/SIGTERM; `config.json` (the
                  model's config and every setting of the run) next to them
    logs/train/, logs/validation/   TensorBoard: loss and each term of the objective, learning rate,
                  steps/s; validation loss, mean Dice of the warped labels, folding %, image slices
    model/        the final model (`models.save`, loadable by `models.load`), with the validation
                  numbers under 'extra'

SIGINT/SIGTERM only set a flag: the loop finishes its step, saves a checkpoint at that step, says
so and stops (the command exits with status 128 + the signal number, 130 or 143; a second signal
interrupts at once). Rerunning the same command resumes from the latest checkpoint at the saved
step, with the same optimizer state and the data order continuing where it stopped (the pair
stream is deterministic for a seed and the first `step` batches are skipped, about 1.5 ms each
at 80x96x80), so an interrupted and resumed run ends with the same weights as an uninterrupted one
(bit for bit with `--deterministic`, which turns TensorFlow's op determinism on for the rest of
the process). A run refuses to resume from checkpoints of another model or other
hyper-parameters.

Distribution (`--strategy`): everything that creates variables is built under `strategy.scope()`;
the train step runs on each replica with `strategy.run`, each replica's loss divided by the number
of replicas so the summed gradients are those of the global batch mean (`--batch_size` is the
GLOBAL batch). Mixed precision (`--mixed_precision`): 'fp16' uses Keras' 'mixed_float16' policy
and a `LossScaleOptimizer` (the GPU choice, automatic on a GPU); 'bf16' uses 'mixed_bfloat16'
without loss scaling (automatic on CPUs with AVX512-BF16 or AMX); the objective is computed in
float32 either way.

Warm start and continuation (`--init_from MODEL_DIR`): a new run (no checkpoint in `workdir`)
starts from the weights of a saved model (an earlier run's `workdir/model`, a shipped model) with
a fresh optimizer. The model's name and weight shapes must match; hyper-parameters that only
change the computation (`lam`, `int_downsize`, ...) may differ and are recorded. The run continues
the saved model's step count (`--steps` counts this run's steps) and pair stream, and the model
it saves records the cumulative number of steps and the whole training history under
`extra['history']` (`empty_history`: every run's settings, the training loss, learning rate and
precision at each progress line, every validation's Dice and folding), so a model trained in
several runs says exactly how it was trained.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from absl import app, flags

FLAGS = flags.FLAGS

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
#: Models that `--patch_size` (patch training, whole-volume validation by patches) applies to.
PATCH_MODELS = ("patch_fcn",)
MIXED_PRECISION = ("auto", "off", "fp16", "bf16", "on")
#: Keras dtype policy of each `--mixed_precision` mode ('on' is the older name of 'fp16').
PRECISION_POLICIES = {"off": "float32", "fp16": "mixed_float16", "on": "mixed_float16",
                      "bf16": "mixed_bfloat16"}
CONFIG_FILE = "config.json"
#: This run's training history rows, next to its checkpoints (rewritten at each checkpoint).
HISTORY_FILE = "history.json"
CONFIG_FORMAT = "mdregnet-train-1"
#: Settings that may change between a run and its resumption without a note.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "val_every", "log_every", "log_dir",
                      "workdir", "strategy", "mixed_precision", "deterministic", "init_from")


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags (all of them, here) on `flag_values`.

    Called by `python -m mdregnet.train` (and by tests on a fresh `flags.FlagValues()`), not on
    import, so the package's apps can import each other without clashing flag names.
    """
    fv = dict(flag_values=flag_values)
    # Model and objective
    flags.DEFINE_string("model", "mdregnet", "Registered model name (mdregnet.models.available()).",
                        **fv)
    flags.DEFINE_string("hparams", None, "JSON dict of hyper-parameter overrides, e.g. "
                        "'{\"smoothing\": \"none\", \"lam\": 0.5}'.", **fv)
    flags.DEFINE_float("lam", None, "Shortcut: overrides the model's regularisation weight `lam` "
                       "(MDReg-Net: 0.35, the paper's choice).", **fv)
    # Data
    flags.DEFINE_string("data_dir", None, "Preprocessed dataset: images/<id>.nii.gz and "
                        "optionally labels/<id>.nii.gz, one grid, intensities in [0, 1].", **fv)
    flags.DEFINE_string("train_subjects", None, "File of training subject ids, one per line "
                        "('#' comments); default every subject in data_dir.", **fv)
    flags.DEFINE_string("val_subjects", None, "File of validation subject ids; default: no "
                        "validation.", **fv)
    flags.DEFINE_integer("patch_size", None, "Patch training (model 'patch_fcn', its paper): the "
                         "model is built for patches of this size per axis (paper: 64) sampled "
                         "from each pair, half in the foreground and half in the background; "
                         "`--batch_size` counts patches (paper: 16); validation registers whole "
                         "volumes by patches (mdregnet.patches.register_by_patches).", **fv)
    flags.DEFINE_integer("patches_per_pair", 2, "Patch pairs drawn from each image pair.", **fv)
    flags.DEFINE_list("input_shape", None, "Spatial size X,Y,Z the volumes are centre-cropped or "
                      "zero-padded to; default the data's own, which must then be divisible by "
                      "the model's factor (16 for mdregnet).", **fv)
    # Optimisation
    flags.DEFINE_integer("steps", 150000, "Total number of training steps (paper: 150,000).", **fv)
    flags.DEFINE_integer("batch_size", 1, "GLOBAL batch size, split over the replicas (paper: 1).",
                         **fv)
    flags.DEFINE_float("lr", 1e-4, "Adam learning rate (paper: 1e-4).", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights' initialisation and the pair order.", **fv)
    flags.DEFINE_string("init_from", None, "Warm start: a saved model directory (config.json + "
                        "model.weights.h5, e.g. an earlier run's workdir/model or a shipped "
                        "model) whose weights this run starts from. Same model and weight "
                        "shapes; hyper-parameters that only change the computation (lam, "
                        "int_downsize, ...) may differ and are recorded. The run continues the "
                        "model's step count, pair stream and training history.", **fv)
    flags.DEFINE_boolean("deterministic", False, "Enable TensorFlow's op determinism (bitwise "
                         "reproducible runs and resumptions, somewhat slower on GPUs; on a CPU "
                         "also set TF_ENABLE_ONEDNN_OPTS=0, whose oneDNN kernels round "
                         "differently under another load).", **fv)
    # Outputs and schedule
    flags.DEFINE_string("workdir", None, "Run directory: ckpt/, logs/, model/.", **fv)
    if "log_dir" not in flag_values:  # absl.logging defines it (for its log files): share it
        flags.DEFINE_string("log_dir", None, "TensorBoard directory; default workdir/logs.", **fv)
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints.", **fv)
    flags.DEFINE_integer("val_every", 5000, "Steps between validations (also at the start and "
                         "the end).", **fv)
    flags.DEFINE_integer("val_pairs", 20, "Number of validation pairs (fixed, seeded).", **fv)
    flags.DEFINE_integer("log_every", 100, "Steps between progress lines and train summaries "
                         "(the loss shown is the mean over those steps).", **fv)
    # Hardware
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy: default "
                      "(one device), one_device, mirrored (all local GPUs, else all logical CPUs), "
                      "multi_worker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG).", **fv)
    flags.DEFINE_enum("mixed_precision", "auto", list(MIXED_PRECISION), "fp16: Keras' "
                      "'mixed_float16' with a LossScaleOptimizer (GPUs); bf16: "
                      "'mixed_bfloat16' (CPUs with AVX512-BF16 or AMX; no loss scaling); off: "
                      "float32; auto: fp16 when a GPU is visible, bf16 on a CPU with bfloat16 "
                      "instructions, else float32; 'on' = fp16. Velocity heads, integration, "
                      "warps, resizing, smoothing and losses stay float32.", **fv)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A setting of the run is wrong or contradicts the run being resumed (one clear line)."""


class OutputError(OSError):
    """The run directory cannot be written (missing parent, not a folder, read-only, disk full).

    Nothing half-written is left: a checkpoint that failed is removed, the previous complete one
    stays the latest (the message names it)."""


class WorkerLostError(RuntimeError):
    """Multi-worker training lost contact with another worker (killed, preempted, network).

    Every worker stops; the chief's last complete checkpoint is intact. Restart every worker with
    the same command (and TF_CONFIG) to resume from it. `python -m mdregnet.train` exits with
    `EXIT_WORKER_LOST` (75, EX_TEMPFAIL: try again) so a scheduler can restart the job."""


#: Exit status of `python -m mdregnet.train` when a worker of the cluster was lost.
EXIT_WORKER_LOST = 75


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (the flags of `python -m mdregnet.train`, same names).

    `train_subjects`/`val_subjects` are a path to a file of ids or a list of ids; `input_shape` is
    `(X, Y, Z)` or None; `hparams` a dict of overrides of the model's defaults.
    """

    model: str = "mdregnet"
    hparams: dict = dataclasses.field(default_factory=dict)
    lam: float = None
    data_dir: str = None
    train_subjects: object = None
    val_subjects: object = None
    input_shape: tuple = None
    patch_size: int = None
    patches_per_pair: int = 2
    steps: int = 150000
    batch_size: int = 1
    lr: float = 1e-4
    seed: int = 0
    init_from: str = None
    deterministic: bool = False
    workdir: str = None
    log_dir: str = None
    checkpoint_every: int = 1000
    val_every: int = 5000
    val_pairs: int = 20
    log_every: int = 100
    strategy: str = "default"
    mixed_precision: str = "auto"

    def to_json(self):
        """The settings as plain JSON data."""
        out = dataclasses.asdict(self)
        if out["input_shape"] is not None:
            out["input_shape"] = [int(n) for n in out["input_shape"]]
        for key in ("train_subjects", "val_subjects"):
            if isinstance(out[key], (list, tuple)):
                out[key] = [str(s) for s in out[key]]
        return out


def as_config(config):
    """A `TrainConfig` from a `TrainConfig` or a dict of its fields (unknown keys: ConfigError)."""
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a TrainConfig or a dict, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid: {sorted(names)}")
    return TrainConfig(**config)


def parse_hparams(text):
    """`--hparams` JSON text to a dict (None or empty: {})."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--hparams is not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--hparams must be a JSON object (dict), got {text!r}")
    return value


def config_from_flags(fv=FLAGS):
    """The `TrainConfig` of parsed flags `fv`."""
    shape = None
    if fv.input_shape:
        try:
            shape = tuple(int(n) for n in fv.input_shape)
        except ValueError:
            raise ConfigError(f"--input_shape must be integers X,Y,Z, got {fv.input_shape}") \
                from None
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values = {name: fv[name].value for name in names}
    values["hparams"] = parse_hparams(fv.hparams)
    values["input_shape"] = shape
    values["log_dir"] = values["log_dir"] or None  # absl's own --log_dir defaults to ''
    return TrainConfig(**values)


def _validate(cfg):
    """Checks the settings that need no data; returns the resolved model hyper-parameters."""
    from mdregnet import models

    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {cfg.strategy!r}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got "
                          f"{cfg.mixed_precision!r}")
    for name in ("steps", "batch_size", "checkpoint_every", "val_every", "val_pairs",
                 "log_every"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, np.integer)) or value < (0 if name == "val_pairs" else 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.patch_size is not None:
        if cfg.model not in PATCH_MODELS:
            raise ConfigError(f"patch_size: patch training is implemented for {PATCH_MODELS}, "
                              f"not {cfg.model!r}")
        if not isinstance(cfg.patch_size, (int, np.integer)) or cfg.patch_size < 1:
            raise ConfigError(f"patch_size must be a positive integer, got {cfg.patch_size!r}")
        if not isinstance(cfg.patches_per_pair, (int, np.integer)) or cfg.patches_per_pair < 1:
            raise ConfigError(f"patches_per_pair must be a positive integer, got "
                              f"{cfg.patches_per_pair!r}")
    if not cfg.data_dir:
        raise ConfigError("data_dir is required")
    if not cfg.workdir:
        raise ConfigError("workdir is required")
    if not isinstance(cfg.hparams, dict):
        raise ConfigError(f"hparams must be a dict, got {cfg.hparams!r}")
    overrides = dict(cfg.hparams)
    if cfg.lam is not None:
        overrides["lam"] = float(cfg.lam)
    try:
        return models.registry.resolve_hparams(cfg.model, **overrides)
    except ValueError as err:  # unknown model (lists the names) or unknown hyper-parameter
        raise ConfigError(str(err)) from None


# ------------------------------------------------------------------------------------------------
# Hardware
# ------------------------------------------------------------------------------------------------
def get_strategy(name="default"):
    """The `tf.distribute.Strategy` called `name`.

    Args:
        name: 'default' (the default strategy: one device, no distribution), 'one_device' (the
            first GPU, else the CPU), 'mirrored' (`MirroredStrategy` over every local GPU, or over
            every logical CPU device when there is no GPU, e.g. after
            `tf.config.set_logical_device_configuration`), 'multi_worker'
            (`MultiWorkerMirroredStrategy`, the cluster read from the TF_CONFIG environment
            variable; a single worker without it).

    Returns:
        The strategy; create it before any other TensorFlow op for 'multi_worker'.
    """
    import tensorflow as tf

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")


def cpu_has_bf16():
    """Whether this machine's CPU has bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), read from
    /proc/cpuinfo's flags (False where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags_ = set(line.split(":", 1)[1].split())
                    return bool(flags_ & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(mode):
    """The Keras dtype policy of a `--mixed_precision` mode.

    Args:
        mode: 'off', 'fp16' (or 'on'), 'bf16', or 'auto' ('mixed_float16' when a GPU is visible,
            'mixed_bfloat16' on a CPU with bfloat16 instructions (`cpu_has_bf16`), else
            'float32': emulated bfloat16 is slower than float32).

    Returns:
        'float32', 'mixed_float16' or 'mixed_bfloat16'.
    """
    import tensorflow as tf

    if mode == "auto":
        if tf.config.list_physical_devices("GPU"):
            return "mixed_float16"
        return "mixed_bfloat16" if cpu_has_bf16() else "float32"
    if mode not in PRECISION_POLICIES:
        raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mode!r}")
    return PRECISION_POLICIES[mode]


def _worker(strategy):
    """`(is_chief, task_id)` of this process (always chief unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                     and "chief" not in resolver.cluster_spec().as_dict())
    return chief, int(task_id)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def allowed_sizes(n, divisor):
    """The sizes next to `n` that are multiples of `divisor` (below and above; `n` if it is one)."""
    if n % divisor == 0:
        return [n]
    below = (n // divisor) * divisor
    return [s for s in (below, below + divisor) if s > 0]


def check_shape(shape, model, divisor, where):
    """Raises ConfigError unless every size of `shape` is divisible by `divisor`, saying which
    sizes are allowed on each bad axis."""
    bad = [(axis, n) for axis, n in enumerate(shape) if n % divisor]
    if not bad:
        return
    nearest = tuple(allowed_sizes(n, divisor)[-1] for n in shape)
    hints = "; ".join(f"axis {axis}: {n} -> {' or '.join(map(str, allowed_sizes(n, divisor)))}"
                      for axis, n in bad)
    raise ConfigError(
        f"{where}: shape {'x'.join(map(str, shape))} cannot be used by model {model!r}, which "
        f"needs every size divisible by {divisor} ({hints}); pass --input_shape "
        f"{','.join(map(str, nearest))} to centre-crop/zero-pad, or preprocess to such a shape "
        "(python -m mdregnet.preprocess --shape)")


def fit_to_shape(volumes, shape):
    """Centre-crops and/or zero-pads the spatial axes of a stack of volumes.

    Args:
        volumes: `(N, X, Y, Z)` array (images or label maps).
        shape: target `(X', Y', Z')`.

    Returns:
        `(array, note)`: the `(N, X', Y', Z')` array, same dtype (padding is 0: image black and
        label background), and a text saying what was done per axis ('' if nothing).
    """
    out = volumes
    notes = []
    for axis, target in enumerate(shape):
        n = out.shape[axis + 1]
        if n > target:
            start = (n - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis + 1)
            notes.append(f"axis {axis} cropped {n}->{target}")
        elif n < target:
            before = (target - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis + 1] = (before, target - n - before)
            out = np.pad(out, pad)
            notes.append(f"axis {axis} padded {n}->{target}")
    return out, ", ".join(notes)


def _load_split(data_dir, subjects, with_labels):
    """`(ids, images (N, X, Y, Z) float32, labels (N, X, Y, Z) int32 or None)` of a subset."""
    from mdregnet import data

    label_dir = os.path.join(data_dir, "labels")
    with_labels = with_labels and os.path.isdir(label_dir)
    found = data.find_subjects(os.path.join(data_dir, "images"),
                               label_dir if with_labels else None,
                               subjects=list(subjects) if isinstance(subjects, tuple) else subjects)
    images, labels, _ = data.load_cohort(found, with_labels=with_labels)
    return [s.id for s in found], images, labels


def validation_pairs(n, n_pairs, seed=0):
    """A fixed, seeded choice of `n_pairs` ordered pairs of distinct subjects.

    Returns:
        `(n_pairs', 2)` int array of (moving, fixed) indices, `n_pairs' = min(n_pairs, n(n-1))`.
    """
    from mdregnet import data

    pairs = np.asarray(data.all_pairs(n, include_identical=False)).reshape(-1, 2)
    order = np.random.default_rng(seed).permutation(len(pairs))
    return pairs[order[:n_pairs]]


def load_data(cfg, divisor, with_validation=True):
    """Loads the training (and validation) volumes of a run, fitted to the model's input size.

    Args:
        cfg: the `TrainConfig`.
        divisor: the model's total down-sampling factor; every input size must be a multiple.
        with_validation: load the validation subjects (only the chief worker validates).

    Returns:
        dict with 'train_ids', 'images' `(N, X, Y, Z)` float32 in [0, 1], 'data_shape' (the files'
        grid), 'shape' (the model's input size: `cfg.input_shape` or the data's) and 'val' (None,
        or a dict with 'ids', 'images', 'labels' (int32 or None) and 'pairs' `(P, 2)`).

    Raises:
        ConfigError: a shape the model cannot take, or too few validation subjects.
    """
    started = time.perf_counter()
    train_ids, images, _ = _load_split(cfg.data_dir, cfg.train_subjects, with_labels=False)
    data_shape = tuple(int(n) for n in images.shape[1:])
    shape = tuple(int(n) for n in cfg.input_shape) if cfg.input_shape else data_shape
    if len(shape) != 3:
        raise ConfigError(f"input_shape must be 3 sizes X,Y,Z, got {cfg.input_shape}")
    where = "--input_shape" if cfg.input_shape else f"{cfg.data_dir}: the data"
    check_shape(shape, cfg.model, divisor, where)
    images, note = fit_to_shape(images, shape)
    if note:
        print(f"volumes centre-cropped/zero-padded from {data_shape} to {shape}: {note}")
    val = None
    if cfg.val_subjects is not None and cfg.val_pairs > 0 and with_validation:
        val_ids, val_images, val_labels = _load_split(cfg.data_dir, cfg.val_subjects, True)
        if tuple(val_images.shape[1:]) != data_shape:
            raise ConfigError(f"{cfg.data_dir}: validation volumes are "
                              f"{val_images.shape[1:]}, training volumes {data_shape}")
        if len(val_ids) < 2:
            raise ConfigError("validation needs at least 2 subjects, got "
                              f"{len(val_ids)}: {val_ids}")
        val_images, _ = fit_to_shape(val_images, shape)
        if val_labels is not None:
            val_labels, _ = fit_to_shape(val_labels, shape)
        val = dict(ids=val_ids, images=val_images, labels=val_labels,
                   pairs=validation_pairs(len(val_ids), cfg.val_pairs, cfg.seed))
    print(f"data: {len(train_ids)} training subjects"
          + (f", {len(val['ids'])} validation subjects ({len(val['pairs'])} pairs, "
             f"{'with' if val['labels'] is not None else 'without'} labels)" if val else "")
          + f", shape {shape}, loaded in {time.perf_counter() - started:.1f} s", flush=True)
    return dict(train_ids=train_ids, images=images, data_shape=data_shape, shape=shape, val=val)


# ------------------------------------------------------------------------------------------------
# Run directory
# ------------------------------------------------------------------------------------------------
def _make_writable_dir(path, what="--workdir"):
    """Creates folder `path` (and parents) and checks a file can be written there.

    Raises:
        OutputError: naming `path` and why (a parent is a file, read-only, disk full, ...).
    """
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise OutputError(f"{what} {path}: cannot write there ({err.strerror or err})") \
            from None


def _remove_partial_checkpoint(prefix):
    """Removes the files of a checkpoint whose save failed (`prefix.*`, TF's `prefix_temp*`)."""
    import glob
    import shutil

    for path in glob.glob(glob.escape(prefix) + ".*") + glob.glob(glob.escape(prefix) + "_temp*"):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# Run config next to the checkpoints
# ------------------------------------------------------------------------------------------------
def _read_run_config(path):
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the run config ({err})") from None
    if not isinstance(saved, dict) or saved.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"{path}: not an mdregnet training config (format {CONFIG_FORMAT!r})")
    return saved


def _check_resumable(path, saved, name, hparams, settings):
    """Refuses to resume checkpoints of another model or other hyper-parameters."""
    old = saved.get("model", {})
    if old.get("name") != name:
        raise ConfigError(f"{path}: the checkpoints next to it were trained with model "
                          f"{old.get('name')!r}, this run asks for {name!r}; use another "
                          "--workdir or the same --model")
    from mdregnet import models

    # Hyper-parameters added to the model since the checkpoints were written take their
    # defaults (which reproduce the old behaviour), so older runs still resume.
    old_hp = {**models.defaults(name), **old.get("hparams", {})}
    keys = sorted(set(old_hp) | set(hparams))
    diff = [f"{k}: saved {old_hp.get(k)!r}, now {hparams.get(k)!r}" for k in keys
            if _jsonable(old_hp.get(k)) != _jsonable(hparams.get(k))]
    if diff:
        raise ConfigError(f"{path}: the checkpoints next to it were trained with other "
                          f"hyper-parameters of {name!r} ({'; '.join(diff)}); use another "
                          "--workdir or the same --hparams/--lam")
    old_settings = saved.get("train", {})
    changed = [k for k in sorted(settings) if k not in _RESUMABLE_CHANGES
               and k in old_settings and old_settings[k] != settings[k]]
    if changed:
        print(f"note: resuming with changed settings {changed} (the pair order may differ from "
              "an uninterrupted run)", flush=True)


def _jsonable(value):
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------------
# Warm start and training history
# ------------------------------------------------------------------------------------------------
#: Columns of the rows of `history["train"]` (one row per progress line).
TRAIN_COLUMNS = ("step", "loss", "lr", "precision", "steps_per_second")


def empty_history():
    """A training history with no run: 'runs' (one dict per training run: its first and last
    cumulative step, init_from, learning rate, precision, hyper-parameters, ...), 'train' (rows
    of `train_columns`: cumulative step, mean training loss since the previous row, learning
    rate, precision, steps/s) and 'validation' (one dict per validation: cumulative step, mean
    Dice, Dice before registration, folding % and count, loss)."""
    return {"train_columns": list(TRAIN_COLUMNS), "runs": [], "train": [], "validation": []}


def _legacy_history(extra):
    """The history of a model saved before histories were recorded: what its config says."""
    history = empty_history()
    run_config = extra.get("run_config") or {}
    train_settings = run_config.get("train") or {}
    steps = int(extra.get("step") or 0)
    if not steps:
        return history
    history["runs"].append({
        "start_step": 0, "end_step": steps, "init_from": None,
        "lr": train_settings.get("lr"), "batch_size": train_settings.get("batch_size"),
        "precision": ("mixed_float16" if (run_config.get("runtime") or {}).get("mixed_precision")
                      else "float32"),
        "hparams": (run_config.get("model") or {}).get("hparams"),
        "note": "trained before training histories were recorded: only its final numbers are "
                "known"})
    if extra.get("train_loss") is not None:
        history["train"].append([steps, extra["train_loss"], train_settings.get("lr"),
                                 history["runs"][0]["precision"], None])
    if isinstance(extra.get("validation"), dict):
        history["validation"].append(dict(extra["validation"], step=steps))
    return history


def read_init(path, name, hparams):
    """Reads the saved model a run warm-starts from (`--init_from`).

    Args:
        path: a model directory written by `models.save` (config.json, model.weights.h5).
        name: the model this run trains; must be the saved one's.
        hparams: this run's resolved hyper-parameters.

    Returns:
        dict: 'from' (absolute path), 'steps' (the saved model's cumulative training steps),
        'changed_hparams' ({key: [saved, now]}), 'history' (the saved model's training history,
        see `empty_history`).

    Raises:
        ConfigError: no readable model there, or a model of another name (one line naming the
            directory). Weight shapes are checked when the weights are loaded.
    """
    from mdregnet import io, models

    try:
        config = models.read_config(path)
    except (io.InvalidInputError, OSError) as err:
        raise ConfigError(f"--init_from: {err}") from None
    if config["name"] != name:
        raise ConfigError(f"--init_from {path}: a {config['name']!r} model; this run trains "
                          f"{name!r} (use --model {config['name']} or another model directory)")
    old = {**models.defaults(name), **config["hparams"]}
    changed = {k: [old.get(k), hparams.get(k)] for k in sorted(set(old) | set(hparams))
               if _jsonable(old.get(k)) != _jsonable(hparams.get(k))}
    extra = config.get("extra") or {}
    history, steps = model_history(extra)
    return {"from": os.path.abspath(path), "steps": steps,
            "changed_hparams": _jsonable(changed), "history": _jsonable(history)}


def model_history(extra):
    """`(history, cumulative_steps)` of a saved model from its config's 'extra' dict: the
    recorded history (`empty_history` layout), or for a model saved before histories were
    recorded the one-run history of its final numbers."""
    history = extra.get("history") if isinstance(extra.get("history"), dict) else None
    steps = extra.get("cumulative_steps", extra.get("step", 0))
    return history or _legacy_history(extra), int(steps or 0)


def merge_history(base, run_record, run_rows):
    """The history of a model: `base` (the history it started from, or None) followed by this
    run's record and rows (`run_rows`: dict with 'train' and 'validation' lists)."""
    out = empty_history()
    if base:
        for key in ("runs", "train", "validation"):
            out[key].extend(base.get(key, []))
    out["runs"].append(run_record)
    out["train"].extend(run_rows["train"])
    out["validation"].extend(run_rows["validation"])
    return out


def _read_run_rows(path, up_to):
    """This run's history rows saved next to its checkpoints, without those after step `up_to`
    (a resumed run repeats them)."""
    rows = {"train": [], "validation": []}
    if not os.path.isfile(path):
        return rows
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        print(f"note: {path} unreadable ({err}); this run's earlier history rows are lost",
              flush=True)
        return rows
    rows["train"] = [r for r in saved.get("train", []) if r and r[0] <= up_to]
    rows["validation"] = [r for r in saved.get("validation", []) if r.get("step", 0) <= up_to]
    return rows


def _write_json(path, value):
    from mdregnet import io

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True)
            f.write("\n")

    io.atomic_write(path, write)


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM handlers that only set a flag (the loop checkpoints and stops).

    A second signal while stopping raises KeyboardInterrupt (to leave a stuck save). Handlers can
    only be installed from the main thread; elsewhere none are installed.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name} while stopping")
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self):
        return None if self.signum is None else signal.Signals(self.signum).name


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
def _as_float32(outputs):
    import tensorflow as tf

    return {k: tf.cast(v, tf.float32) for k, v in outputs.items()}


def make_train_step(model, loss_fn, optimizer, strategy, loss_scaling=False):
    """The distributed train step, a `tf.function` of one distributed batch.

    Each replica computes the objective on its share `(B/R, X, Y, Z, 1)` of the global batch
    (float32, the model's outputs cast to float32), divides it by the number of replicas R (the
    optimizer all-reduces gradients by summation, so their sum is the gradient of the global batch
    mean), scales it for the `LossScaleOptimizer` when `loss_scaling`, and applies the gradients.

    Returns:
        `step(batch) -> (total, terms)`, both reduced to the global batch mean (float32 scalars;
        `terms` the objective's dict).
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync

    def replica_step(moving, fixed):
        with tf.GradientTape() as tape:
            outputs = _as_float32(model([moving, fixed], training=True))
            total, terms = loss_fn(moving, fixed, outputs)
            loss = tf.cast(total, tf.float32) / replicas
            if loss_scaling:
                loss = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return tf.cast(total, tf.float32), {k: tf.cast(v, tf.float32) for k, v in terms.items()}

    def mean(value):
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

    @tf.function
    def step(batch):
        moving, fixed = batch
        total, terms = strategy.run(replica_step, args=(moving, fixed))
        return mean(total), {k: mean(v) for k, v in terms.items()}

    return step


def make_predict(model, loss_fn):
    """`predict(moving, fixed) -> (outputs, total)`: a `tf.function` forward pass with the loss.

    Inputs `(1, X, Y, Z, 1)` float32; `outputs` keeps 'warped' and 'disp' (float32, disp in
    voxels), `total` the objective (float32 scalar).
    """
    import tensorflow as tf

    @tf.function
    def predict(moving, fixed):
        outputs = _as_float32(model([moving, fixed], training=False))
        total, _ = loss_fn(moving, fixed, outputs)
        return {"warped": outputs["warped"], "disp": outputs["disp"]}, tf.cast(total, tf.float32)

    return predict


def make_patch_predict(model, loss_fn, patch_size):
    """`predict(moving, fixed) -> (outputs, total)` of a patch-trained model on whole volumes:
    the paper's patch inference (`mdregnet.patches.register_by_patches`: the central part of each
    patch's velocity kept and stitched, integrated once), then the objective on the result."""
    import tensorflow as tf

    from mdregnet import patches

    size = int(patch_size)
    keep = int(model.mdregnet_config["hparams"].get("patch_keep", size // 2))
    keep = keep if keep < size else size // 2  # the paper's 32 of 64; half of a smaller patch

    def predict(moving, fixed):
        outputs = _as_float32(patches.register_by_patches(model, moving, fixed, patch_size=size,
                                                          keep=keep))
        total, _ = loss_fn(moving, fixed, outputs)
        return {"warped": outputs["warped"], "disp": outputs["disp"]}, tf.cast(total, tf.float32)

    return predict


def validate(predict, images, labels, pairs):
    """Registers the validation pairs and measures the result.

    Args:
        predict: from `make_predict`.
        images: `(N, X, Y, Z)` float32 in [0, 1]; labels: `(N, X, Y, Z)` int32 or None.
        pairs: `(P, 2)` (moving, fixed) indices.

    Returns:
        `(metrics, slices)`: metrics dict with 'loss' (mean objective), 'pairs' (P), and with
        labels 'dice_mean' (mean over pairs of the mean Dice over the fixed map's labels, the
        moving labels warped by nearest neighbour), 'dice_before' (the same without
        registration); always 'folding_percent' and 'folding_count' (mean over pairs of the
        voxels with det(I + grad u) <= 0, % of the grid and count). `slices` are central axial
        (Z) slices `(X, Y)` of fixed, moving and warped of the first pair, for image summaries.
    """
    import tensorflow as tf

    from mdregnet import layers, metrics

    losses, dices, before, fold_pct, fold_count = [], [], [], [], []
    slices = None
    for moving_i, fixed_i in pairs:
        moving = tf.constant(images[moving_i][None, ..., None])
        fixed = tf.constant(images[fixed_i][None, ..., None])
        outputs, total = predict(moving, fixed)
        losses.append(float(total))
        disp = outputs["disp"]
        fold = metrics.folding(disp.numpy()[0])
        fold_pct.append(fold["percent"])
        fold_count.append(fold["count"])
        if labels is not None:
            warped_labels = layers.warp(tf.constant(labels[moving_i][None, ..., None]), disp,
                                        interp_method="nearest")
            dices.append(metrics.dice(labels[fixed_i], warped_labels.numpy()[0, ..., 0])[1])
            before.append(metrics.dice(labels[fixed_i], labels[moving_i])[1])
        if slices is None:
            z = images.shape[3] // 2
            slices = {"fixed": images[fixed_i][:, :, z], "moving": images[moving_i][:, :, z],
                      "warped": outputs["warped"].numpy()[0, :, :, z, 0]}
    out = {"loss": float(np.mean(losses)), "pairs": int(len(pairs)),
           "folding_percent": float(np.mean(fold_pct)),
           "folding_count": float(np.mean(fold_count))}
    if labels is not None:
        out["dice_mean"] = float(np.nanmean(dices))
        out["dice_before"] = float(np.nanmean(before))
    return out, slices


def _summary_metadata(plugin):
    from tensorflow.core.framework import summary_pb2

    # The TensorBoard plugins' data (ScalarPluginData, ImagePluginData) at version 0 serialise to
    # empty bytes; written with core TF ops so TensorBoard need not be installed to train.
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=b""))


def summary_scalar(name, value, step):
    """Writes a TensorBoard scalar to the default writer (as `tf.summary.scalar`, which needs the
    `tensorboard` package)."""
    import tensorflow as tf

    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                     metadata=_summary_metadata("scalars"))


def summary_image(name, image, step):
    """Writes a TensorBoard image (as `tf.summary.image`) of a 2D array `(H, W)` in [0, 1]."""
    import tensorflow as tf

    pixels = np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    png = tf.io.encode_png(pixels[:, :, None])
    tensor = tf.stack([tf.as_string(pixels.shape[1]), tf.as_string(pixels.shape[0]), png])
    tf.summary.write(name, tensor, step=step, metadata=_summary_metadata("images"))


def _read(variable):
    """The value of a (Keras, possibly mirrored) scalar variable as a float."""
    import tensorflow as tf

    return float(tf.convert_to_tensor(getattr(variable, "value", variable)).numpy())


def _COLLECTIVE_ERRORS(tf):
    """The errors a collective op raises when a peer worker is gone or the cluster is aborted."""
    return (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError)


def _first_line(err):
    text = (getattr(err, "message", None) or str(err)).strip()
    text = text.split("\n")[0]
    return text[:300]


def _format_eta(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
class Trainer:
    """One training run, in the manner of tensorflow/models' `official/core/base_trainer.py`:
    `setup` (strategy, data, run directory, model, optimizer, checkpoint, pipeline, writers),
    `restore` (the run's own checkpoint, or the weights of `init_from`), `step`, `log`,
    `validate`, `checkpoint` and `finish` (the final model); `run` composes them. `train()` is
    `Trainer(config).run()`; see it for the arguments, the summary returned and the errors.
    """

    def __init__(self, config, step_callback=None):
        self.cfg = as_config(config)
        self.hparams = _validate(self.cfg)
        self.step_callback = step_callback

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self):
        """Everything before the first step; nothing is written before the checks passed."""
        import tensorflow as tf

        from mdregnet import models

        cfg = self.cfg
        self.strategy = get_strategy(cfg.strategy)  # first: MultiWorkerMirroredStrategy needs it
        self.replicas = self.strategy.num_replicas_in_sync
        if cfg.batch_size % self.replicas:
            raise ConfigError(f"batch_size {cfg.batch_size} (global) is not divisible by the "
                              f"{self.replicas} replicas of strategy {cfg.strategy!r}")
        self.is_chief, self.task_id = _worker(self.strategy)
        self.precision = resolve_precision(cfg.mixed_precision)
        self.mixed = self.precision != "float32"
        # bfloat16 has float32's exponent range: only float16 needs loss scaling
        self.loss_scaling = self.precision == "mixed_float16"
        self.divisor = models.get_method(cfg.model).divisor
        # data (validation on the chief only: it needs no collective op)
        loaded = load_data(cfg, self.divisor, with_validation=self.is_chief)
        self.train_ids, self.images, self.val = (loaded["train_ids"], loaded["images"],
                                                 loaded["val"])
        self.data_shape, self.shape = loaded["data_shape"], loaded["shape"]
        self._setup_run_directory(tf)
        self._build()
        self.restore()
        self._write_run_config()
        self._setup_pipeline()
        self._setup_writers()

    def _setup_run_directory(self, tf):
        """Paths, the resumption check against the run config beside the checkpoints, the warm
        start's record, and a writable run directory."""
        cfg = self.cfg
        self.ckpt_dir = os.path.join(cfg.workdir, "ckpt")
        self.log_dir = cfg.log_dir or os.path.join(cfg.workdir, "logs")
        self.model_dir = os.path.join(cfg.workdir, "model")
        self.config_path = os.path.join(self.ckpt_dir, CONFIG_FILE)
        self.history_path = os.path.join(self.ckpt_dir, HISTORY_FILE)
        self.latest = (tf.train.latest_checkpoint(self.ckpt_dir)
                       if os.path.isdir(self.ckpt_dir) else None)
        self.settings = cfg.to_json()
        self.init = None
        if self.latest:
            if not os.path.isfile(self.config_path):
                raise ConfigError(f"{self.ckpt_dir}: checkpoints without {CONFIG_FILE}; cannot "
                                  "check that they belong to this model; use another --workdir")
            saved_run = _read_run_config(self.config_path)
            _check_resumable(self.config_path, saved_run, cfg.model, self.hparams,
                             self.settings)
            self.init = saved_run.get("init")  # the warm start of the run being resumed, if any
            if cfg.init_from and (self.init or {}).get("from") != os.path.abspath(cfg.init_from):
                print(f"note: --init_from {cfg.init_from} ignored: resuming the run in "
                      f"{cfg.workdir}, whose checkpoints hold the weights", flush=True)
        elif cfg.init_from:
            self.init = read_init(cfg.init_from, cfg.model, self.hparams)
        self.base_step = int(self.init["steps"]) if self.init else 0
        _make_writable_dir(cfg.workdir, "--workdir")
        _make_writable_dir(self.ckpt_dir, "--workdir's checkpoint folder")
        self.save_dir = (self.ckpt_dir if self.is_chief
                         else os.path.join(self.ckpt_dir, f".worker{self.task_id}"))

    def _build(self):
        """Model, objective, optimizer and checkpoint, under the strategy's scope and the
        precision's Keras policy (restored afterwards)."""
        import keras
        import tensorflow as tf

        from mdregnet import models

        cfg = self.cfg
        keras.utils.set_random_seed(cfg.seed)
        if cfg.deterministic:
            tf.config.experimental.enable_op_determinism()
        previous_policy = keras.mixed_precision.global_policy()
        if self.mixed:
            keras.mixed_precision.set_global_policy(self.precision)
        try:
            model_shape = (int(cfg.patch_size),) * len(self.shape) if cfg.patch_size \
                else self.shape
            if cfg.patch_size:
                check_shape(model_shape, cfg.model, self.divisor, "--patch_size")
            with self.strategy.scope():
                self.model = models.build(cfg.model, model_shape, **self.hparams)
                self.loss_fn = models.objective(self.model)
                optimizer = keras.optimizers.Adam(learning_rate=cfg.lr)
                if self.loss_scaling:
                    optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
                optimizer.build(self.model.trainable_variables)  # slots exist before a restore
                self.optimizer = optimizer
                self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
                self.ckpt = tf.train.Checkpoint(model=self.model, optimizer=optimizer,
                                                step=self.step_var)
                self.manager = tf.train.CheckpointManager(self.ckpt, self.save_dir,
                                                          max_to_keep=3, checkpoint_name="ckpt")
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def restore(self):
        """Restores the run's latest checkpoint (model, optimizer, step), or else loads the
        weights of `init_from` (a warm start, fresh optimizer)."""
        from mdregnet import models

        self.resumed_from = None
        with self.strategy.scope():
            if self.latest:
                self.ckpt.restore(self.latest).assert_existing_objects_matched()
                self.resumed_from = int(self.step_var.numpy())
            elif self.init:
                try:
                    models.load_weights(self.model, self.cfg.init_from)
                except (ValueError, OSError) as err:
                    changed = "; ".join(f"{k}: saved {a!r}, now {b!r}"
                                        for k, (a, b) in self.init["changed_hparams"].items())
                    raise ConfigError(f"--init_from: {err}"
                                      + (f" (hyper-parameters that differ: {changed})"
                                         if changed else "")) from None
        self.start_step = int(self.step_var.numpy())
        # This run's history rows (cumulative steps), saved beside each checkpoint so a resumed
        # run keeps them; merged with the warm start's history into the saved model's config.
        self.run_rows = (_read_run_rows(self.history_path, self.base_step + self.start_step)
                         if self.latest else {"train": [], "validation": []})

    def _write_run_config(self):
        import keras
        import tensorflow as tf

        self.run_config = {
            "format": CONFIG_FORMAT, "model": _jsonable(self.model.mdregnet_config),
            "init": self.init, "train": self.settings,
            "data": {"shape": list(self.data_shape), "input_shape": list(self.shape),
                     "train_ids": self.train_ids,
                     "val_ids": self.val["ids"] if self.val else []},
            "runtime": {"strategy": self.cfg.strategy, "replicas": self.replicas,
                        "mixed_precision": self.mixed, "precision": self.precision,
                        "tensorflow": tf.__version__, "keras": keras.__version__}}
        if self.is_chief:
            _write_json(self.config_path, self.run_config)

    def _setup_pipeline(self):
        """The deterministic pair stream, continued at the model's step; the step and predict
        functions."""
        import tensorflow as tf

        from mdregnet import data

        cfg = self.cfg
        offset = self.base_step + self.start_step
        if cfg.patch_size:
            from mdregnet import patches

            dataset = patches.patch_pair_dataset(self.images, patch_size=cfg.patch_size,
                                                 patches_per_pair=cfg.patches_per_pair,
                                                 batch_size=cfg.batch_size, seed=cfg.seed)
            if offset:
                dataset = dataset.skip(offset)
        else:  # a warm-started run continues the pair stream of the model it starts from
            dataset = data.pair_dataset(self.images, batch_size=cfg.batch_size, seed=cfg.seed,
                                        shuffle=True, repeat=True, start=offset)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
        self.batches = iter(self.strategy.experimental_distribute_dataset(dataset))
        self.train_step = make_train_step(self.model, self.loss_fn, self.optimizer,
                                          self.strategy, loss_scaling=self.loss_scaling)
        if not self.val:
            self.predict = None
        elif cfg.patch_size:
            self.predict = make_patch_predict(self.model, self.loss_fn, cfg.patch_size)
        else:
            self.predict = make_predict(self.model, self.loss_fn)

    def _setup_writers(self):
        import tensorflow as tf

        if self.is_chief:
            self.train_writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
            self.val_writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "validation"))
        else:
            self.train_writer = self.val_writer = tf.summary.create_noop_writer()
        self.summary = {
            "steps": self.cfg.steps, "interrupted": False, "signal": None,
            "resumed_from": self.resumed_from, "loss_history": [], "val_history": [],
            "validation": None, "train_loss": None, "model_dir": None,
            "replicas": self.replicas, "strategy": self.cfg.strategy,
            "mixed_precision": self.mixed, "precision": self.precision,
            "input_shape": list(self.shape), "workdir": os.path.abspath(self.cfg.workdir)}
        self.pending = []  # (total, terms) tensors of the steps since the last log line
        self.timer_step = self.timer_start = None

    # ---- records -------------------------------------------------------------------------------
    def run_record(self, step, completed):
        """This run's entry of the history's 'runs' list (see `empty_history`)."""
        cfg, init = self.cfg, self.init
        return {"start_step": self.base_step, "end_step": self.base_step + step,
                "init_from": init["from"] if init else None,
                "changed_hparams": init["changed_hparams"] if init else {},
                "hparams": _jsonable(self.hparams), "lr": cfg.lr, "batch_size": cfg.batch_size,
                "precision": self.precision, "seed": cfg.seed, "strategy": cfg.strategy,
                "replicas": self.replicas, "input_shape": list(self.shape),
                "data_dir": cfg.data_dir, "train_subjects": len(self.train_ids),
                "completed": bool(completed),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save_history(self, step, completed=False):
        if self.is_chief:
            _write_json(self.history_path,
                        {"run": self.run_record(step, completed), **self.run_rows})

    # ---- the loop's parts ----------------------------------------------------------------------
    def step(self, step):
        """Runs training step `step` (1-based) on the next batch."""
        import tensorflow as tf

        try:
            total, terms = self.train_step(next(self.batches))
        except _COLLECTIVE_ERRORS(tf) as err:
            if self.cfg.strategy != "multi_worker":
                raise
            raise WorkerLostError(
                f"worker {self.task_id}: lost contact with the cluster at step {step} "
                f"({type(err).__name__}: {_first_line(err)}); the last complete checkpoint "
                f"is {tf.train.latest_checkpoint(self.ckpt_dir) or 'none'}: restart every "
                "worker with the same command to resume from it") from None
        self.pending.append((total, terms))
        if self.timer_start is None:  # the first step traces and compiles: time from its end
            self.timer_step, self.timer_start = step, time.perf_counter()

    def log(self, step):
        """A progress line, a history row and the TensorBoard scalars of the steps since the
        last one (their mean loss and terms)."""
        cfg, pending = self.cfg, self.pending
        mean_total = float(np.mean([float(t) for t, _ in pending]))
        mean_terms = {k: float(np.mean([float(t[k]) for _, t in pending])) for k in pending[-1][1]}
        self.pending = []
        if not math.isfinite(mean_total) and not self.loss_scaling:
            raise FloatingPointError(f"the loss is {mean_total} at step {step}; last "
                                     f"checkpoint: {self.manager.latest_checkpoint}")
        elapsed = time.perf_counter() - self.timer_start
        rate = (step - self.timer_step) / elapsed if step > self.timer_step else float("nan")
        eta = _format_eta((cfg.steps - step) / rate) if rate > 0 else "?"
        self.summary["loss_history"].append([step, mean_total])
        self.summary["train_loss"] = mean_total
        lr_now = _read(self.optimizer.learning_rate)
        cum = self.base_step + step
        self.run_rows["train"].append([cum, mean_total, lr_now, self.precision,
                                       rate if math.isfinite(rate) else None])
        with self.train_writer.as_default():
            summary_scalar("loss", mean_total, cum)
            for key, value in mean_terms.items():
                summary_scalar(f"loss/{key}", value, cum)
            summary_scalar("learning_rate", lr_now, cum)
            if math.isfinite(rate):
                summary_scalar("steps_per_second", rate, cum)
            if self.loss_scaling:
                summary_scalar("loss_scale", _read(self.optimizer.dynamic_scale), cum)
        self.train_writer.flush()
        print(f"step {step}/{cfg.steps}" + (f" (model step {cum})" if self.base_step else "")
              + f"  loss {mean_total:.5f}  {rate:.3g} steps/s  ETA {eta}", flush=True)

    def validate(self, step):
        """Registers the validation pairs (`validate`), records and logs the numbers."""
        metrics_, slices = validate(self.predict, self.val["images"], self.val["labels"],
                                    self.val["pairs"])
        cum = self.base_step + step
        self.summary["validation"] = dict(metrics_, step=cum)
        self.summary["val_history"].append([step, metrics_])
        rows = self.run_rows["validation"]
        if not rows or rows[-1]["step"] != cum:
            rows.append(dict(metrics_, step=cum))
        with self.val_writer.as_default():
            for key in ("loss", "dice_mean", "dice_before", "folding_percent", "folding_count"):
                if key in metrics_:
                    summary_scalar(key, metrics_[key], cum)
            for key, image in slices.items():
                summary_image(f"slice/{key}", image, cum)
        self.val_writer.flush()
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics_.items() if k != "pairs")
        print(f"validation at step {cum} ({metrics_['pairs']} pairs): {text}", flush=True)

    def checkpoint(self, step):
        """Saves checkpoint `step` and this run's history rows beside it.

        Raises:
            OutputError: the checkpoint could not be written; its partial files are removed.
        """
        import tensorflow as tf

        self.step_var.assign(step)
        try:
            saved = self.manager.save(checkpoint_number=step)
            self.save_history(step)
            return saved
        except (OSError, tf.errors.OpError) as err:
            _remove_partial_checkpoint(os.path.join(self.save_dir, f"ckpt-{step}"))
            reason = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
            raise OutputError(f"{self.save_dir}: cannot write the checkpoint of step {step} "
                              f"({reason.splitlines()[0] if reason else type(err).__name__}); "
                              f"the last complete checkpoint is "
                              f"{tf.train.latest_checkpoint(self.save_dir) or 'none'}") from None

    def finish(self, step):
        """After the last step: the final validation and the saved model (chief), with the
        cumulative step count and the whole training history."""
        from mdregnet import models

        val = self.val
        if val and (self.summary["validation"] is None
                    or self.summary["validation"]["step"] != self.base_step + step):
            self.validate(step)
        if self.is_chief:
            self.save_history(step, completed=True)
            history = merge_history(self.init["history"] if self.init else None,
                                    self.run_record(step, completed=True), self.run_rows)
            extra = {"step": self.base_step + step, "cumulative_steps": self.base_step + step,
                     "run_steps": step, "train_loss": self.summary["train_loss"],
                     "validation": self.summary["validation"], "run_config": self.run_config,
                     "history": history}
            models.save(self.model, self.model_dir, extra=_jsonable(extra))
            self.summary["model_dir"] = os.path.abspath(self.model_dir)
            print(f"final model saved in {self.model_dir}", flush=True)

    # ---- the composition -----------------------------------------------------------------------
    def _announce(self):
        cfg = self.cfg
        if self.resumed_from is not None:
            print(f"resumed from {self.latest} at step {self.resumed_from}", flush=True)
        elif self.init:
            print(f"warm start from {self.init['from']} (trained {self.base_step} steps"
                  + (f"; changed hyper-parameters {self.init['changed_hparams']}"
                     if self.init["changed_hparams"] else "") + ")", flush=True)
        n_params = sum(int(np.prod(v.shape)) for v in self.model.trainable_variables)
        print(f"training {cfg.model} ({n_params} parameters) for {cfg.steps} steps, global batch "
              f"{cfg.batch_size} on {self.replicas} replica(s) ({cfg.strategy}), lr {cfg.lr}, "
              f"{self.precision}, workdir {cfg.workdir}", flush=True)

    def _loop(self, stop):
        """Steps until `cfg.steps` or a stop signal; returns the step reached."""
        cfg = self.cfg
        step = self.start_step
        last_saved = self.start_step if self.latest else None
        # The starting point is validated once: a warm start's was, as the end of its run.
        if self.val and step == 0 and step < cfg.steps and not self.init:
            self.validate(0)
        while step < cfg.steps and stop.signum is None:
            step += 1
            self.step(step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                self.log(step)
            if step % cfg.checkpoint_every == 0:
                self.checkpoint(step)
                last_saved = step
            if self.val and step % cfg.val_every == 0 and step < cfg.steps:
                self.validate(step)
            if self.step_callback is not None:
                self.step_callback(step)
        if last_saved != step:
            self.checkpoint(step)
        return step

    def run(self):
        """`setup`, the loop (checkpointing and stopping cleanly on SIGINT/SIGTERM), `finish`;
        returns the summary dict of `train`."""
        self.setup()
        self._announce()
        summary = self.summary
        with _StopFlag() as stop:
            step = self._loop(stop)
            summary["checkpoint"] = self.manager.latest_checkpoint
            if stop.signum is not None:
                summary["interrupted"], summary["signal"] = True, stop.name
                print(f"stopped by {stop.name} at step {step}/{self.cfg.steps}; checkpoint "
                      f"{self.manager.latest_checkpoint} saved; run the same command again to "
                      "resume", flush=True)
        if self.timer_start is not None and step > self.timer_step:
            summary["seconds_per_step"] = ((time.perf_counter() - self.timer_start)
                                           / (step - self.timer_step))
        summary["step"] = step
        if not summary["interrupted"]:
            self.finish(step)
        if not self.is_chief:  # the other workers' checkpoints are scratch copies
            import shutil

            shutil.rmtree(self.save_dir, ignore_errors=True)
        self.train_writer.close()
        self.val_writer.close()
        return summary


def train(config, step_callback=None):
    """Trains a model; resumes from `workdir/ckpt` when checkpoints are there.

    Args:
        config: a `TrainConfig` or a dict of its fields (the flags' names).
        step_callback: optional `fn(step)` called after each step on the host (tests use it to
            send a signal).

    Returns:
        Summary dict: 'step' (reached), 'steps' (asked), 'interrupted' (bool), 'signal' (name or
        None), 'resumed_from' (step or None), 'checkpoint' (latest path), 'model_dir' (None when
        interrupted), 'train_loss' (mean over the last logged window), 'loss_history' (list of
        [step, mean loss over the window]), 'validation' (last metrics, see `validate`, or None),
        'val_history' (list of [step, metrics]), 'seconds_per_step' (excluding the first step,
        which traces), 'replicas', 'strategy', 'mixed_precision' (bool), 'precision' (the Keras
        policy), 'input_shape', 'workdir'.

    Raises:
        ConfigError: a wrong setting, a data shape the model cannot take, or checkpoints of
            another model/hyper-parameters in `workdir`.
        mdregnet.io.InvalidInputError / FileNotFoundError: unusable data.
        OutputError: the run directory cannot be written (before training starts), or a
            checkpoint could not be written (disk full, ...): its partial files are removed and
            the message names the last complete checkpoint.
        WorkerLostError: multi-worker training lost another worker (see the class).
        FloatingPointError: the loss became NaN/Inf (not in mixed precision, where the loss
            scale skips such steps).
    """
    return Trainer(config, step_callback).run()


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    from mdregnet import io

    logging.set_verbosity(logging.WARNING)  # TF's per-checkpoint INFO lines drown the progress
    try:
        summary = train(config_from_flags(FLAGS))
    except WorkerLostError as err:
        print(f"mdregnet.train: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_WORKER_LOST)
    except (ConfigError, io.InvalidInputError, OSError) as err:
        # OSError: FileNotFoundError of the data, OutputError of the run directory.
        sys.exit(f"mdregnet.train: error: {err}")
    if summary["interrupted"]:  # the conventional status of a process ended by that signal
        sys.exit(128 + int(getattr(signal, summary["signal"])))


if __name__ == "__main__":
    define_flags()
    app.run(main)
