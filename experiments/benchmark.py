"""Speed and memory of every model of the factory, side by side with ANTs SyN and VoxelMorph-torch.

    python experiments/benchmark.py                      # or: make benchmark
    python experiments/benchmark.py [--models mdregnet,voxelmorph] [--sizes 176x192x176,80x112x80]
        [--repeats 3] [--peers ants,voxelmorph_torch] [--peer_sizes 80x112x80,176x192x176]
        [--peer_python /work/peers-venv/bin/python] [--device auto|cpu|gpu]
        [--mixed_precision auto|on|off] [--out experiments/results/benchmark_cpu.json]

Not a test: the numbers depend on the machine and on what else runs on it (the load average is
recorded around every measurement). To emulate the 2-core CPU of the targets on a larger machine,
run it under `taskset -c 0,1` (every subprocess inherits the affinity).

Models: `--models all` is every model of `mdregnet.models.available()` that takes 3D inputs, with
the paper's settings, plus the opt-in speed variants of `SPEED_VARIANTS` (`mdregnet:int_downsize=2`:
MDReg-Net integrating its final SVF on the 1/2 grid). `--models` takes names and such
`name:key=value` specs.

What is measured, for each model of `mdregnet.models.available()` that takes 3D inputs (`--models`)
and each size (`--sizes`, default 176x192x176, the MDReg-Net paper's; 160x192x224, VoxelMorph's
OASIS; 80x112x80, the 2 mm grid of the shipped models), each (model, size) in a SUBPROCESS of its
own, so that its peak memory is its own and a crash or an out-of-memory kill loses that cell only:
- inference per pair: one `tf.function` with a fixed input signature (traced once) calling the
  model and returning 'disp' and 'warped', what registering a pair needs (`--inverse` adds
  'inverse_disp' and 'warped_fixed'), until both are numpy arrays on the host. The first call
  (tracing, XLA compilation of the warps) is reported apart from the median of `--repeats` calls.
- training step: the computation of `mdregnet.train.make_train_step` on one replica (the model's
  own objective, `models.objective`, its gradient and Adam with lr 1e-4, batch 1), compiled with
  a fixed input signature; first step apart, then the median of `--repeats` steps.
- peak memory of each phase: on CPU the process's peak resident set (VmHWM, reset between the
  phases through /proc/self/clear_refs where the kernel allows it, else the process peak so far);
  on a GPU the peak of TensorFlow's allocator (`tf.config.experimental.get_memory_info`).
- weights: the shipped 2 mm weights (`mdregnet/pretrained/<name>_ixi2mm`, any grid: the networks
  are fully convolutional) for the models that have them, so that their warps follow a trained
  network's fields (an untrained network's are near zero, which flatters the warps' memory
  access); untrained for the others, or for all with `--untrained`.
- float32 on CPU; on a GPU `--mixed_precision auto` builds the models with Keras'
  'mixed_float16' policy (and the training step with a `LossScaleOptimizer`), as training does.
A phase stops repeating once its repeats have taken `--phase_budget_s` (at least one repeat; the
number done is recorded), a cell is killed after `--cell_timeout` seconds or when its resident
memory passes `--max_rss_gib`, and what it measured before that is kept.

Peers (`--peers`), on the same pair and in the same run, for the sizes of `--peer_sizes`: ANTs SyN
through antspyx (`ants.registration(fixed, moving, type_of_transform='SyN')`, its defaults) and
VoxelMorph's own PyTorch package (0.3.x, `VxmPairwise`, 7 integration steps, untrained weights:
timing only), each run by `experiments/benchmark_peers.py` in a subprocess of `--peer_python`
(default: this interpreter), so they can live in a virtual environment of their own; a peer that
cannot be imported there is reported as "not installed" and the rest runs. The table gives, per
model and size, the peers' time divided by the model's median inference time.

The pair: the two OASIS brains of ../shared/data/oasis (`aligned_norm.nii.gz` moving,
`aligned_norm_2.nii.gz` fixed, 160x192x224 at 1 mm; `--pair MOVING,FIXED` for others; a synthetic
pair when they are absent, said in the output), each zoomed by the one isotropic factor
(at most 1) that fits both brains' bounding box into the size, then centred and zero-padded or
cropped to it (`fit_to_grid`), so the peers register real brains.

Outputs: the Markdown table (the machine: CPU model, cores, memory, TensorFlow version, device;
the targets of issue #5 with the measured values) printed and written next to the JSON (`--out`,
default experiments/results/benchmark_{cpu,gpu}.json and .md), both rewritten after every cell, so
an interrupted run leaves what it measured.

Runtime of the default command on an idle 2-core CPU (Xeon with AVX-512, TF 2.21), with the
nine models registered at the time: 36.5 minutes measured with a phase budget of 30 s; the
default budget is now 15 s, which by that run's per-call times makes it about 31 minutes. A 1 mm
cell takes 70-120 s (the first training step, tracing and compiling the gradient, is 25-55 s of
it), a 2 mm cell 20-40 s, ANTs SyN 6 s at 2 mm and 70 s at 176x192x176, VoxelMorph-torch 2 s and
11 s per call. More models or load make it longer; `--models`, `--sizes`, `--no_train` and
`--peer_sizes` make it shorter.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_RUNNER = os.path.join(REPO, "experiments", "benchmark_peers.py")
SHARED_DATA = os.environ.get("MDREGNET_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))
DEFAULT_PAIR = (os.path.join(SHARED_DATA, "oasis", "aligned_norm.nii.gz"),
                os.path.join(SHARED_DATA, "oasis", "aligned_norm_2.nii.gz"))

#: The sizes of issue #5 and what each is.
SIZES = {(176, 192, 176): "MDReg-Net paper, 1 mm",
         (160, 192, 224): "VoxelMorph / OASIS, 1 mm",
         (80, 112, 80): "2 mm training grid"}
DEFAULT_PEER_SIZES = ((80, 112, 80), (176, 192, 176))
PEERS = ("ants", "voxelmorph_torch")
PEER_NAMES = {"ants": "ANTs SyN", "voxelmorph_torch": "VoxelMorph-torch"}

#: Targets of issue #5 on a 2-core CPU: (model, size) -> limits.
TARGET_MODEL = "mdregnet"
TARGET_SIZE = (176, 192, 176)
TARGET_INFER_S = 1.5
TARGET_TRAIN_S = 6.0
TARGET_TRAIN_RSS_GIB = 8.0
TARGET_RATIOS = {"ants": 30.0, "voxelmorph_torch": 8.0}
#: Opt-in speed settings measured too by `--models all`, as `name:key=value[:key=value]` cells
#: (a variant is a model of the factory with other hyper-parameters; its targets are reported
#: beside the paper settings', never instead of them).
SPEED_VARIANTS = ("mdregnet:int_downsize=2",)


def parse_model_spec(text):
    """`'mdregnet:int_downsize=2'` -> `('mdregnet', {'int_downsize': 2})` (values as JSON, else
    strings); a plain name gives `(name, {})`."""
    name, *pairs = text.strip().split(":")
    hparams = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"model {text!r}: '{pair}' is not key=value")
        try:
            hparams[key] = json.loads(value)
        except ValueError:
            hparams[key] = value
    return name, hparams

#: Fields of a model cell's result (the smoke test checks them).
MODEL_FIELDS = ("model", "shape", "status", "device", "precision", "tensorflow", "params",
                "build_s", "outputs", "infer_first_s", "infer_median_s", "infer_times_s",
                "infer_peak", "infer_loadavg_start", "infer_loadavg_end", "train_first_s",
                "train_median_s", "train_times_s", "train_peak", "train_loadavg_start",
                "train_loadavg_end", "train_loss", "finite")

GIB = 2.0**30


# ------------------------------------------------------------------------------------------------
# The pair
# ------------------------------------------------------------------------------------------------
def parse_size(text):
    """'176x192x176' (or with commas) -> (176, 192, 176)."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"a size is three integers like 176x192x176, got {text!r}") from None
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"a size is three positive integers like 176x192x176, got {text!r}")
    return size


def size_name(size):
    return "x".join(str(n) for n in size)


def brain_box(volumes, threshold=0.01, margin=4):
    """`(lo, hi)` voxel bounds (hi exclusive) of the voxels above `threshold * max` of any volume,
    widened by `margin` voxels and clipped to the grid."""
    shape = np.array(volumes[0].shape)
    lo, hi = shape.copy(), np.zeros_like(shape)
    for volume in volumes:
        idx = np.argwhere(volume > threshold * float(volume.max()))
        if len(idx):
            lo, hi = np.minimum(lo, idx.min(0)), np.maximum(hi, idx.max(0) + 1)
    if np.any(hi <= lo):
        return np.zeros_like(shape), shape
    return np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)


def fit_to_grid(volume, size, box):
    """`volume` zoomed so that `box` fits `size`, then centred on the box and cropped/zero-padded.

    The zoom factor is the largest isotropic factor, at most 1, that fits the box (the brain
    plus a margin) into `size`; linear interpolation (`scipy.ndimage.zoom`, order 1).

    Returns:
        `(float32 array of shape size, zoom factor)`.
    """
    from scipy import ndimage

    lo, hi = (np.asarray(b, np.float64) for b in box)
    factor = float(min(1.0, min(n / (h - l) for n, h, l in zip(size, hi, lo))))
    if factor < 1.0:
        volume = ndimage.zoom(volume, factor, order=1, prefilter=False)
        lo, hi = lo * factor, hi * factor
    centre = np.round((lo + hi) / 2.0).astype(int)
    out = np.zeros(size, np.float32)
    src, dst = [], []
    for n_in, n_out, c in zip(volume.shape, size, centre):
        start = c - n_out // 2  # source index of output voxel 0
        s0, s1 = max(start, 0), min(start + n_out, n_in)
        src.append(slice(s0, s1))
        dst.append(slice(s0 - start, s1 - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out, factor


def synthetic_volume(size, shift, seed):
    """A smooth ellipsoid 'brain' with folds, in [0, 1] (when the real pair is absent)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.indices(size, dtype=np.float32)
    centre = (np.array(size, np.float32) - 1) / 2 + np.array(shift, np.float32)
    r2 = sum(((grid[a] - centre[a]) / (0.4 * size[a])) ** 2 for a in range(3))
    folds = 0.5 + 0.5 * np.sin(grid[0] / 3.0 + shift[0]) * np.cos(grid[1] / 4.0 + shift[1])
    image = np.where(r2 < 1, 0.4 + 0.4 * folds, 0.0) + 0.02 * rng.random(size)
    image = ndimage.gaussian_filter(image.astype(np.float32), 1.0)
    return (image / image.max()).astype(np.float32)


def load_pair(paths=DEFAULT_PAIR):
    """`(moving, fixed, description)`: the real pair as float32 in [0, 1], or None when absent."""
    if not all(os.path.isfile(p) for p in paths):
        return None
    import nibabel as nib

    volumes = []
    for path in paths:
        array = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
        array = np.squeeze(array)
        if array.ndim != 3:
            raise ValueError(f"{path}: expected a 3D image, got shape {array.shape}")
        hi = float(np.percentile(array, 99.9)) if array.max() > 1.0 else 1.0
        volumes.append(np.clip(array / max(hi, 1e-6), 0.0, 1.0))
    return volumes[0], volumes[1], " and ".join(os.path.basename(p) for p in paths)


def make_pair(size, source):
    """The (moving, fixed) pair of float32 arrays of `size` and a note saying how it was made."""
    if source is None:
        return (synthetic_volume(size, (2.0, -1.5, 1.0), 1), synthetic_volume(size, (0, 0, 0), 2),
                "synthetic pair (the OASIS pair was not found)")
    moving, fixed, name = source
    box = brain_box([moving, fixed])
    moving_fit, factor = fit_to_grid(moving, size, box)
    fixed_fit, _ = fit_to_grid(fixed, size, box)
    return moving_fit, fixed_fit, f"{name}, zoom {factor:.3f}, centred on the brains"


# ------------------------------------------------------------------------------------------------
# Memory and load
# ------------------------------------------------------------------------------------------------
def _proc_status(pid="self"):
    """Dict of the kB fields of /proc/PID/status (VmRSS, VmHWM, ...), empty where unavailable."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def peak_rss_bytes():
    """Peak resident memory of this process (VmHWM, else ru_maxrss)."""
    peak = _proc_status().get("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
    return peak


def reset_peak_rss():
    """Resets this process's peak resident memory to its current value (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class PeakMemory:
    """Peak memory of one phase: process RSS on CPU, TensorFlow's allocator on a GPU."""

    def __init__(self, gpu):
        self.gpu = gpu
        self.rss_reset = False

    def reset(self):
        self.rss_reset = reset_peak_rss()
        if self.gpu:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")

    def read(self):
        out = {"rss_gib": peak_rss_bytes() / GIB,
               "rss_scope": "phase" if self.rss_reset else "process so far"}
        if self.gpu:
            import tensorflow as tf

            out["gpu_gib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / GIB
        return out


# ------------------------------------------------------------------------------------------------
# One (model, size) cell: runs in the subprocess
# ------------------------------------------------------------------------------------------------
def _repeat(call, repeats, budget_s):
    """Times `call` up to `repeats` times, stopping once the calls took `budget_s` (>= 1 call)."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if sum(times) >= budget_s:
            break
    return times


def make_train_step(model, shape, mixed_precision=False, lr=1e-4):
    """One training step of batch 1, compiled with a fixed input signature.

    The computation of `mdregnet.train.make_train_step` on one replica: the model's own objective
    (`models.objective(model)`) on the model's outputs cast to float32, its gradient, Adam with
    learning rate `lr` (in a `LossScaleOptimizer` with mixed precision).

    Returns:
        `step(moving, fixed) -> total` (float32 scalar tensor).
    """
    import keras
    import tensorflow as tf

    from mdregnet import models

    loss_fn = models.objective(model)
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    if mixed_precision:
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    spec = tf.TensorSpec((1, *shape, 1), tf.float32)

    @tf.function(input_signature=[spec, spec])
    def step(moving, fixed):
        with tf.GradientTape() as tape:
            outputs = {k: tf.cast(v, tf.float32)
                       for k, v in model([moving, fixed], training=True).items()}
            total, _ = loss_fn(moving, fixed, outputs)
            total = tf.cast(total, tf.float32)
            loss = optimizer.scale_loss(total) if mixed_precision else total
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return total

    return step


def shipped_weights(name, hparams=None):
    """The weights of the shipped 2 mm model of `name` (`mdregnet/pretrained/<name>_ixi2mm`) and
    the hyper-parameters to build it with (its own, updated by `hparams`), or `(None, None)`.

    The networks are fully convolutional, so trained weights fit any grid; with them the fields
    the warps follow are a trained network's (smooth, several voxels), where an untrained one's
    are near zero, which makes the warps' gathers and scatters unrealistically cache-friendly.
    """
    from mdregnet import models

    directory = os.path.join(REPO, "mdregnet", "pretrained", f"{name}_ixi2mm")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return None, None
    shipped = models.load(directory)
    return shipped.get_weights(), {**shipped.mdregnet_config["hparams"], **(hparams or {})}


def measure_model(name, shape, moving, fixed, repeats=3, train=True, inverse=False,
                  mixed_precision=False, phase_budget_s=15.0, hparams=None, report=None,
                  trained=False):
    """Times one model's inference and training step on one pair, in this process.

    Args:
        name: a name of `mdregnet.models.available()`.
        shape: spatial size `(X, Y, Z)`.
        moving, fixed: float32 arrays of `shape` in [0, 1].
        repeats: timed calls after the first, per phase (fewer if `phase_budget_s` runs out).
        train: also time the training step.
        inverse: inference also returns 'inverse_disp' and 'warped_fixed' (when the model has
            them); default only 'disp' and 'warped'.
        mixed_precision: build the model with Keras' 'mixed_float16' policy (GPU).
        phase_budget_s: a phase stops repeating once its repeats took this long.
        hparams: overrides of the model's defaults.
        report: optional `report(result)` called after each phase with the result so far.
        trained: start from the shipped model's weights where `name` has one
            (`shipped_weights`); 'weights' in the result says which were used.

    Returns:
        dict with the keys of `MODEL_FIELDS` (seconds, GiB): 'status' is 'ok', or 'error' with
        'error' (what was measured before the error is kept).
    """
    import keras
    import tensorflow as tf

    from mdregnet import models

    gpu = bool(tf.config.list_logical_devices("GPU"))
    result = dict.fromkeys(MODEL_FIELDS)
    result.update(model=name, shape=list(shape), status="running",
                  device="gpu" if gpu else "cpu",
                  precision="mixed_float16" if mixed_precision else "float32",
                  tensorflow=tf.__version__, repeats_asked=repeats)
    report = report or (lambda r: None)
    memory = PeakMemory(gpu)
    try:
        previous_policy = keras.mixed_precision.global_policy()
        if mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            weights, shipped_hparams = shipped_weights(name, hparams) if trained else (None,
                                                                                       None)
            start = time.perf_counter()
            model = models.build(name, shape, **(shipped_hparams or hparams or {}))
            result["build_s"] = time.perf_counter() - start
            result["weights"] = "untrained"
            if weights is not None:
                model.set_weights(weights)
                result["weights"] = f"shipped {name}_ixi2mm"
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
        result["params"] = int(model.count_params())
        result["rss_after_build_gib"] = peak_rss_bytes() / GIB

        keys = ("disp", "warped") + (("inverse_disp", "warped_fixed") if inverse else ())
        spec = tf.TensorSpec((1, *shape, 1), tf.float32)

        @tf.function(input_signature=[spec, spec])
        def infer(moving_t, fixed_t):
            out = model([moving_t, fixed_t], training=False)
            return {k: tf.cast(out[k], tf.float32) for k in keys if k in out}

        moving_t = tf.constant(np.asarray(moving, np.float32)[None, ..., None])
        fixed_t = tf.constant(np.asarray(fixed, np.float32)[None, ..., None])
        last = {}

        def infer_call():
            last["out"] = {k: v.numpy() for k, v in infer(moving_t, fixed_t).items()}

        memory.reset()
        result["infer_loadavg_start"] = loadavg()
        start = time.perf_counter()
        infer_call()
        result["infer_first_s"] = time.perf_counter() - start
        result["outputs"] = sorted(last["out"])
        times = _repeat(infer_call, repeats, phase_budget_s)
        result["infer_loadavg_end"] = loadavg()
        result["infer_times_s"] = times
        result["infer_median_s"] = statistics.median(times)
        result["infer_peak"] = memory.read()
        result["finite"] = bool(all(np.isfinite(v).all() for v in last["out"].values()))
        last.clear()
        report(result)

        if train:
            step = make_train_step(model, shape, mixed_precision)
            losses = []

            def train_call():
                losses.append(float(step(moving_t, fixed_t)))

            memory.reset()
            result["train_loadavg_start"] = loadavg()
            start = time.perf_counter()
            train_call()
            result["train_first_s"] = time.perf_counter() - start
            times = _repeat(train_call, repeats, phase_budget_s)
            result["train_loadavg_end"] = loadavg()
            result["train_times_s"] = times
            result["train_median_s"] = statistics.median(times)
            result["train_peak"] = memory.read()
            result["train_loss"] = losses[-1]
            result["finite"] = bool(result["finite"] and all(math.isfinite(x) for x in losses))
        result["status"] = "ok"
    except Exception as err:  # the cell's row says what failed; the other cells still run
        result["status"] = "error"
        result["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:600]
    report(result)
    return result


def list_models():
    """The registered models with what the benchmark needs to know, and the TF runtime."""
    import tensorflow as tf

    from mdregnet import models

    rows = []
    for name in models.available():
        method = models.get_method(name)
        dims = tuple(getattr(method, "spatial_dims", getattr(method, "ndims", (2, 3))) or (2, 3))
        if isinstance(dims, int):
            dims = (dims,)
        rows.append({"name": name, "divisor": int(getattr(method, "divisor", 1) or 1),
                     "diffeomorphic": bool(getattr(method, "diffeomorphic", False)),
                     "three_d": 3 in dims})
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except Exception:  # details are optional
            details = {}
        gpus.append(details.get("device_name") or gpu.name)
    return {"models": rows, "tensorflow": tf.__version__, "gpus": gpus}


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def worker_main(spec_path):
    """Entry of the subprocess: reads the spec, measures, writes the result file."""
    with open(spec_path) as f:
        spec = json.load(f)
    import tensorflow as tf

    if spec.get("device") == "cpu":
        tf.config.set_visible_devices([], "GPU")
    elif spec.get("device") == "gpu" and not tf.config.list_physical_devices("GPU"):
        _write_json(spec["result"], {"status": "error", "error": "--device gpu but TensorFlow "
                                     "sees no GPU"})
        return
    if spec["kind"] == "list":
        _write_json(spec["result"], list_models())
        return
    with np.load(spec["pair"]) as pair:
        moving, fixed = pair["moving"], pair["fixed"]
    measure_model(spec["model"], tuple(spec["shape"]), moving, fixed, repeats=spec["repeats"],
                  train=spec["train"], inverse=spec["inverse"],
                  mixed_precision=spec["mixed_precision"],
                  phase_budget_s=spec["phase_budget_s"], hparams=spec.get("hparams"),
                  trained=spec.get("trained", False),
                  report=lambda result: _write_json(spec["result"], result))


# ------------------------------------------------------------------------------------------------
# Subprocesses (the parent)
# ------------------------------------------------------------------------------------------------
def run_child(cmd, result_path, log_path, timeout_s, max_rss_bytes, env=None):
    """Runs `cmd` with a watchdog; returns `(result dict or None, problem or None, peak RSS)`.

    The child is killed when it runs past `timeout_s` or its resident memory passes
    `max_rss_bytes`. `problem` is None, or a dict: 'problem' says what happened (the kill, or the
    exit status and the log's last error line), 'log_tail' the last lines of its output.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
    start = time.monotonic()
    problem, peak = None, 0
    try:
        while proc.poll() is None:
            status = _proc_status(proc.pid)
            peak = max(peak, status.get("VmHWM", 0), status.get("VmRSS", 0))
            if max_rss_bytes and status.get("VmRSS", 0) > max_rss_bytes:
                problem = (f"killed: resident memory {status['VmRSS'] / GIB:.1f} GiB passed "
                           f"--max_rss_gib {max_rss_bytes / GIB:.1f}")
                _kill(proc)
            elif time.monotonic() - start > timeout_s:
                problem = f"killed: still running after {timeout_s:.0f} s (--cell_timeout)"
                _kill(proc)
            time.sleep(0.2)
    except BaseException:
        _kill(proc)
        raise
    if problem is None and proc.returncode != 0:
        if proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            problem = f"died of {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        else:
            problem = f"exit status {proc.returncode}"
        tail = _last_line(log_path)
        if tail:
            problem += f": {tail}"
    result = None
    if os.path.isfile(result_path):
        try:
            with open(result_path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            problem = (problem or "") + " (its result file is unreadable)"
    if problem:
        problem = {"problem": problem, "log_tail": _tail(log_path)}
    return result, problem, peak


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip()[:300] for line in f if line.strip()][-n:]
    except OSError:
        return []


def _last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):  # the exception line, not TensorFlow's log noise
        if "Error" in line or "error" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def _child_env(device):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def machine_info(runtime):
    """CPU model, cores, memory, OS, Python, TensorFlow version and device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = _proc_meminfo().get("MemTotal")
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": round(mem / GIB, 1) if mem else None, "platform": platform.platform(),
            "python": platform.python_version(), "tensorflow": runtime.get("tensorflow"),
            "gpus": runtime.get("gpus", []), "hostname": platform.node()}


def _proc_meminfo():
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if parts:
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def _fmt(value, digits=2, suffix=""):
    """A number for the table: `digits` decimals, none from 100 up, 3 below 0.1; '-' for None."""
    if value is None:
        return "-"
    if value >= 100:
        digits = 0
    elif value < 0.1:
        digits = max(digits, 3)
    return f"{value:.{digits}f}{suffix}"


def _load_range(start, end):
    """'a-b': the 1-minute load average at the start and the end of a measurement."""
    if not start or not end:
        return "-"
    return f"{start[0]:.1f}-{end[0]:.1f}"


def peer_time(report, peer, size):
    """Median seconds of `peer` on the pair of `size`, or None."""
    for row in report.get("peers", []):
        if row.get("peer") == peer and tuple(row.get("shape") or ()) == tuple(size) \
                and row.get("status") == "ok":
            return row.get("median_s")
    return None


def ratios(report, cell):
    """`{peer: peer seconds / model median inference seconds}` for the peers run at its size."""
    out = {}
    model_s = cell.get("infer_median_s")
    for peer in PEERS:
        seconds = peer_time(report, peer, cell["shape"])
        if seconds and model_s:
            out[peer] = seconds / model_s
    return out


def _memory_cell(peak, gpu):
    if not peak:
        return "-"
    if gpu and peak.get("gpu_gib") is not None:
        return f"{peak['gpu_gib']:.2f} (dev)"
    return _fmt(peak.get("rss_gib"))


def targets(report):
    """Rows `(target, measured, met)` of issue #5's CPU targets (None where not measured): those
    of `TARGET_MODEL` with the paper's settings, then those of its variants that were measured
    (`SPEED_VARIANTS`, labelled as opt-in)."""
    rows = _targets_of(report, TARGET_MODEL)
    measured = {c.get("model") for c in report.get("cells", [])}
    for variant in SPEED_VARIANTS:
        if variant in measured and parse_model_spec(variant)[0] == TARGET_MODEL:
            rows += _targets_of(report, variant, " (opt-in)")
    return rows


def _targets_of(report, model_name, label=""):
    cell = next((c for c in report.get("cells", []) if c.get("model") == model_name
                 and tuple(c.get("shape") or ()) == TARGET_SIZE), None) or {}
    size = size_name(TARGET_SIZE)
    rows = []
    infer_s = cell.get("infer_median_s")
    name = f"`{model_name}`{label}"
    rows.append((f"{name} inference at {size} <= {TARGET_INFER_S} s",
                 _fmt(infer_s, 2, " s") if infer_s else "not measured",
                 None if infer_s is None else infer_s <= TARGET_INFER_S))
    for peer, factor in TARGET_RATIOS.items():
        for size_ in report.get("peer_sizes", []):
            seconds = peer_time(report, peer, size_)
            model = next((c for c in report.get("cells", []) if c.get("model") == model_name
                          and tuple(c.get("shape") or ()) == tuple(size_)), {})
            ratio = seconds / model["infer_median_s"] if seconds and model.get(
                "infer_median_s") else None
            rows.append((f"{name} >= {factor:g}x faster than {PEER_NAMES[peer]} at "
                         f"{size_name(size_)}",
                         f"{ratio:.1f}x" if ratio else "not measured",
                         None if ratio is None else ratio >= factor))
    train_s = cell.get("train_median_s")
    rows.append((f"{name} training step at {size} <= {TARGET_TRAIN_S} s",
                 _fmt(train_s, 2, " s") if train_s else "not measured",
                 None if train_s is None else train_s <= TARGET_TRAIN_S))
    rss = (cell.get("train_peak") or {}).get("rss_gib")
    rows.append((f"{name} training peak RSS at {size} <= {TARGET_TRAIN_RSS_GIB:g} GiB",
                 _fmt(rss, 2, " GiB") if rss else "not measured",
                 None if rss is None else rss <= TARGET_TRAIN_RSS_GIB))
    return rows


def render_markdown(report):
    """The Markdown report: machine, pair, one table per size, the targets."""
    m = report["machine"]
    gpu = report.get("device") == "gpu"
    lines = [f"# Benchmark: inference, training step and peak memory ({report['device']})", ""]
    lines.append(f"Machine: {m['cpu']}, {m['usable_cores']} usable of {m['cores']} cores, "
                 f"{m['memory_gib']} GiB RAM" + (f", GPU {', '.join(m['gpus'])}" if m['gpus']
                                                 else "") +
                 f"; {m['platform']}; Python {m['python']}, TensorFlow {m['tensorflow']}; "
                 f"device {report['device']}, {report['precision']}.")
    lines.append(f"Run: {report['started']} to {report.get('finished') or '(running)'}, "
                 f"load average (1, 5, 15 min) at start {report['loadavg_start']}, at end "
                 f"{report.get('loadavg_end')}.")
    lines.append(f"Command: `{report['command']}`")
    lines.append("")
    lines.append(f"Pair: {report['pair']}. Inference = a compiled `tf.function` returning "
                 f"{', '.join(report['outputs'])} on the host; first call (tracing and XLA "
                 f"compilation) apart, then the median of up to {report['repeats']} calls. Train "
                 "step = the model's own objective, its gradient and Adam (lr 1e-4), batch 1, "
                 "as `mdregnet.train` does. Peak memory = " +
                 ("TensorFlow's device allocator peak ('dev') of each phase" if gpu else
                  "the process's peak RSS in each phase") +
                 ". Peers: the time of one registration (ANTs SyN) or the median forward pass "
                 "(VoxelMorph-torch, untrained); 'x ANTs' = ANTs seconds / the model's median "
                 "inference seconds. Load = 1-minute load average at the start and end of the "
                 "phase.")
    shipped = sorted({f"`{c['model']}` ({c['weights']})" for c in report.get("cells", [])
                      if c.get("weights") not in (None, "untrained")})
    lines.append("")
    lines.append("Weights: " + (", ".join(shipped) + " start from the shipped 2 mm weights "
                                "(trained fields, several voxels); the others are untrained "
                                "(near-zero fields)" if shipped else "every model untrained "
                                "(near-zero fields)") + ".")
    lines.append("")
    for size in report["sizes"]:
        size = tuple(size)
        lines.append(f"### {size_name(size)} ({SIZES.get(size, 'custom size')})")
        lines.append("")
        lines.append("| method | params | inference first (s) | inference median (s) | "
                     "train first (s) | train median (s) | peak mem inference (GiB) | "
                     "peak mem train (GiB) | x ANTs SyN | x VoxelMorph-torch | load infer | "
                     "load train | status |")
        lines.append("|" + " --- |" * 13)
        for cell in report.get("cells", []):
            if tuple(cell.get("shape") or ()) != size:
                continue
            r = ratios(report, cell)
            status = cell.get("problem") or (f"error: {cell['error']}" if cell.get("error")
                                             else cell.get("status", "?"))
            n_inf, n_tr = len(cell.get("infer_times_s") or []), len(cell.get("train_times_s") or [])
            cols = [f"`{cell['model']}`",
                    f"{cell['params'] / 1e3:.0f}k" if cell.get("params") else "-",
                    _fmt(cell.get("infer_first_s")),
                    _fmt(cell.get("infer_median_s")) + (f" (n={n_inf})" if n_inf else ""),
                    _fmt(cell.get("train_first_s")),
                    _fmt(cell.get("train_median_s")) + (f" (n={n_tr})" if n_tr else ""),
                    _memory_cell(cell.get("infer_peak"), gpu),
                    _memory_cell(cell.get("train_peak"), gpu),
                    _fmt(r["ants"], 1, "x") if "ants" in r else "-",
                    _fmt(r["voxelmorph_torch"], 1, "x") if "voxelmorph_torch" in r else "-",
                    _load_range(cell.get("infer_loadavg_start"), cell.get("infer_loadavg_end")),
                    _load_range(cell.get("train_loadavg_start"), cell.get("train_loadavg_end")),
                    status]
            lines.append("| " + " | ".join(cols) + " |")
        for row in report.get("peers", []):
            if tuple(row.get("shape") or ()) != size:
                continue
            version = ", ".join(f"{k} {v}" for k, v in (row.get("version") or {}).items() if v)
            status = row.get("problem") or (f"{row.get('status')}: {row['error']}"
                                            if row.get("status") != "ok" and row.get("error")
                                            else row.get("status", "?"))
            peak = row.get("gpu_peak_gib") if gpu and row.get("gpu_peak_gib") is not None \
                else row.get("rss_peak_gib")
            n = len(row.get("times_s") or [])
            n = n - 1 if row["peer"] == "voxelmorph_torch" and n > 1 else n
            cols = [PEER_NAMES.get(row["peer"], row["peer"]) + (f" ({version})" if version
                                                                 else ""),
                    f"{row['params'] / 1e3:.0f}k" if row.get("params") else "-",
                    _fmt(row.get("first_s")),
                    _fmt(row.get("median_s")) + (f" (n={n})" if n else ""),
                    "-", "-", _fmt(peak), "-", "-", "-",
                    _load_range(row.get("loadavg_start"), row.get("loadavg_end")), "-", status]
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    lines.append("### Targets of issue #5 (2-core CPU)")
    lines.append("")
    if report["device"] != "cpu" or m["usable_cores"] != 2:
        lines.append(f"(The targets are for a 2-core CPU; this run used {m['usable_cores']} cores"
                     f" on {report['device']}.)")
        lines.append("")
    lines.append("| target | measured | met |")
    lines.append("| --- | --- | --- |")
    for target, measured, met in targets(report):
        lines.append(f"| {target} | {measured} | "
                     f"{'-' if met is None else ('yes' if met else 'NO')} |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def parse_peer_python(text):
    """'PATH' (every peer) or 'ants=PATH,voxelmorph_torch=PATH' -> {peer: python}."""
    out = dict.fromkeys(PEERS, sys.executable)
    if not text:
        return out
    if "=" not in text:
        return dict.fromkeys(PEERS, text)
    for part in text.split(","):
        peer, _, path = part.partition("=")
        if peer not in PEERS:
            raise ValueError(f"--peer_python: unknown peer {peer!r}; peers are {PEERS}")
        out[peer] = path
    return out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all",
                        help="comma-separated model names, or 'all' (every registered model that "
                             "takes 3D inputs)")
    parser.add_argument("--sizes", default=",".join(size_name(s) for s in SIZES),
                        help="comma-separated XxYxZ sizes")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per phase after the first (inference, train step)")
    parser.add_argument("--phase_budget_s", type=float, default=15.0,
                        help="a phase stops repeating once its repeats took this long")
    parser.add_argument("--no_train", action="store_true", help="skip the training step")
    parser.add_argument("--untrained", action="store_true",
                        help="untrained weights for every model (default: the shipped 2 mm "
                             "weights for the models that have them)")
    parser.add_argument("--inverse", action="store_true",
                        help="inference also returns 'inverse_disp' and 'warped_fixed'")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers among ants,voxelmorph_torch, or 'none'")
    parser.add_argument("--peer_sizes", default=",".join(size_name(s) for s in
                                                         DEFAULT_PEER_SIZES),
                        help="sizes at which the peers run (ANTs SyN takes minutes at 1 mm)")
    parser.add_argument("--peer_python", default=None,
                        help="interpreter with the peers installed (default: this one), or "
                             "'ants=PATH,voxelmorph_torch=PATH'")
    parser.add_argument("--peer_repeats", type=int, default=1,
                        help="ANTs registrations per size (VoxelMorph-torch makes --repeats calls "
                             "after the first, as the models)")
    parser.add_argument("--pair", default=None,
                        help="MOVING,FIXED NIfTI files (default: the OASIS pair of "
                             "../shared/data/oasis)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--mixed_precision", default="auto", choices=("auto", "on", "off"),
                        help="auto: on when the device is a GPU (float32 on CPU)")
    parser.add_argument("--cell_timeout", type=float, default=1800.0,
                        help="seconds after which a cell (or a peer) is killed")
    parser.add_argument("--max_rss_gib", type=float, default=None,
                        help="a cell is killed when its resident memory passes this (default: "
                             "85%% of the machine's memory, at most what is available at start)")
    parser.add_argument("--out", default=None,
                        help="JSON file; the Markdown goes next to it (default "
                             "experiments/results/benchmark_{cpu,gpu}.json)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._worker:
        worker_main(args._worker)
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    peers = [] if args.peers.strip().lower() in ("", "none") else \
        [p.strip() for p in args.peers.split(",") if p.strip()]
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"--peers: unknown peer {peer!r}; peers are {', '.join(PEERS)}")
    peer_sizes = [parse_size(s) for s in args.peer_sizes.split(",") if s.strip()] if peers else []
    peer_python = parse_peer_python(args.peer_python)
    meminfo = _proc_meminfo()
    if args.max_rss_gib:
        max_rss = args.max_rss_gib * GIB
    elif meminfo.get("MemTotal"):  # leave room for what else runs on the machine
        max_rss = min(0.85 * meminfo["MemTotal"], meminfo.get("MemAvailable", math.inf))
    else:
        max_rss = None

    tmp = tempfile.mkdtemp(prefix="mdregnet_bench_")
    env = _child_env(args.device)

    def child(spec, name):
        spec_path = os.path.join(tmp, f"{name}.spec.json")
        spec["result"] = os.path.join(tmp, f"{name}.result.json")
        spec["device"] = args.device
        _write_json(spec_path, spec)
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", spec_path]
        return run_child(cmd, spec["result"], os.path.join(tmp, f"{name}.log"),
                         args.cell_timeout, max_rss, env)

    runtime, problem, _ = child({"kind": "list"}, "list")
    if runtime is None or "models" not in runtime:  # e.g. --device gpu without a GPU
        reason = (runtime or {}).get("error") or (problem or {}).get("problem")
        raise SystemExit(f"cannot list the models: {reason}")
    device = "gpu" if runtime["gpus"] and args.device != "cpu" else "cpu"
    mixed = args.mixed_precision == "on" or (args.mixed_precision == "auto" and device == "gpu")
    registered = {row["name"]: row for row in runtime["models"]}
    if args.models == "all":
        names = [n for n, row in registered.items() if row["three_d"]]
        names += [v for v in SPEED_VARIANTS if parse_model_spec(v)[0] in names]
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        try:
            unknown = [n for n in names if parse_model_spec(n)[0] not in registered]
        except ValueError as err:
            raise SystemExit(f"--models: {err}")
        if unknown:
            raise SystemExit(f"--models: unknown {unknown}; available: {', '.join(registered)}")
    out_json = args.out or os.path.join(REPO, "experiments", "results",
                                        f"benchmark_{device}.json")
    out_md = os.path.splitext(out_json)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)

    source = None
    pair_files = tuple(args.pair.split(",")) if args.pair else DEFAULT_PAIR
    if len(pair_files) != 2:
        raise SystemExit("--pair takes MOVING,FIXED")
    source = load_pair(pair_files)
    if source is None and args.pair:
        raise SystemExit(f"--pair: cannot find {pair_files}")
    pair_paths, pair_notes = {}, {}
    for size in dict.fromkeys(sizes + peer_sizes):
        moving, fixed, note = make_pair(size, source)
        pair_paths[size] = os.path.join(tmp, f"pair_{size_name(size)}.npz")
        np.savez(pair_paths[size], moving=moving, fixed=fixed)
        pair_notes[size_name(size)] = note

    report = {"format": "mdregnet-benchmark-1", "command": shlex.join([sys.executable] + (
        sys.argv if argv is None else [__file__] + list(argv))),
        "machine": machine_info(runtime), "device": device,
        "precision": "mixed_float16" if mixed else "float32",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None,
        "loadavg_start": loadavg(), "loadavg_end": None,
        "pair": ("the OASIS pair " + source[2] if source else "a synthetic pair") +
        ", fitted to each size (isotropic zoom <= 1, centred)", "pair_per_size": pair_notes,
        "outputs": ["disp", "warped"] + (["inverse_disp", "warped_fixed"] if args.inverse
                                         else []),
        "repeats": args.repeats, "phase_budget_s": args.phase_budget_s,
        "train": not args.no_train, "models": names, "sizes": [list(s) for s in sizes],
        "peer_sizes": [list(s) for s in peer_sizes], "peer_python": peer_python,
        "max_rss_gib": max_rss / GIB if max_rss else None, "cells": [], "peers": []}

    def save():
        _write_json(out_json, report)
        with open(out_md + ".tmp", "w") as f:
            f.write(render_markdown(report))
        os.replace(out_md + ".tmp", out_md)

    print(f"benchmark: {len(names)} models x {len(sizes)} sizes on {device}; peers "
          f"{peers or 'none'} at {[size_name(s) for s in peer_sizes]}; writing {out_json}",
          flush=True)
    started = time.monotonic()
    try:
        for size in sizes + [s for s in peer_sizes if s not in sizes]:
            if size not in sizes:
                report["sizes"].append(list(size))
            for name in (names if size in sizes else []):
                base, hparams = parse_model_spec(name)
                row = registered[base]
                tag = f"{name} {size_name(size)}"
                cell = {"model": name, "shape": list(size)}
                if not row["three_d"]:
                    cell.update(status="skipped", problem="skipped: 2D only")
                elif any(n % row["divisor"] for n in size):
                    cell.update(status="skipped", problem=f"skipped: sizes must be divisible "
                                                          f"by {row['divisor']}")
                else:
                    load0 = loadavg()
                    result, problem, peak = child(
                        {"kind": "model", "model": base, "hparams": hparams,
                         "shape": list(size),
                         "pair": pair_paths[size], "repeats": args.repeats,
                         "train": not args.no_train, "inverse": args.inverse,
                         "trained": not args.untrained,
                         "mixed_precision": mixed, "phase_budget_s": args.phase_budget_s},
                        f"{name.replace(':', '_').replace('=', '-')}_{size_name(size)}")
                    cell.update(result or {})
                    cell["model"] = name  # the variant's spec, e.g. 'mdregnet:int_downsize=2'
                    cell["hparams"] = hparams
                    cell["cell_loadavg"] = [load0, loadavg()]
                    cell["watchdog_peak_rss_gib"] = peak / GIB
                    if problem:
                        cell.update(problem)
                        if cell.get("status") in (None, "running"):
                            cell["status"] = "failed"
                report["cells"].append(cell)
                save()
                print(f"  {tag}: {cell.get('status')}  inference {_fmt(cell.get('infer_first_s'))}"
                      f" s first, {_fmt(cell.get('infer_median_s'))} s median; train step "
                      f"{_fmt(cell.get('train_median_s'))} s; {cell.get('problem') or ''}"
                      f"{cell.get('error') or ''}  [{time.monotonic() - started:.0f} s]",
                      flush=True)
            if size not in peer_sizes:
                continue
            for peer in peers:
                name = f"peer_{peer}_{size_name(size)}"
                result_path = os.path.join(tmp, f"{name}.result.json")
                cmd = [peer_python[peer], PEER_RUNNER, "--peer", peer, "--pair", pair_paths[size],
                       "--out", result_path, "--repeats",
                       str(args.peer_repeats if peer == "ants" else args.repeats),
                       "--device", args.device]
                result, problem, peak = run_child(cmd, result_path,
                                                  os.path.join(tmp, f"{name}.log"),
                                                  args.cell_timeout, max_rss, env)
                row = {"peer": peer, "shape": list(size), "status": "failed"}
                row.update(result or {})
                row["watchdog_peak_rss_gib"] = peak / GIB
                if problem:
                    row.update(problem)
                report["peers"].append(row)
                save()
                print(f"  {PEER_NAMES[peer]} {size_name(size)}: {row.get('status')} "
                      f"{_fmt(row.get('median_s'))} s {row.get('problem') or ''}"
                      f"{row.get('error') or ''}  [{time.monotonic() - started:.0f} s]",
                      flush=True)
    except KeyboardInterrupt:
        report["interrupted"] = True
        print("interrupted: writing what was measured", flush=True)
    finally:
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["loadavg_end"] = loadavg()
        report["wall_s"] = time.monotonic() - started
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(render_markdown(report))
    print(f"wrote {out_json} and {out_md} ({report['wall_s'] / 60:.1f} min)")
    return 130 if report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
