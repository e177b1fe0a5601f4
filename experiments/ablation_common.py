"""Shared pieces of the ablation scripts (`experiments/ablation_*.py`): training, reports.

Each ablation script trains a few variants of a registered model (`mdregnet.models.build`) with
the package's own train step (`mdregnet.train.make_train_step`, default strategy, Adam) on
in-memory batches, scores them, and writes `experiments/results/ablation_<name>.md` (Markdown
tables, the settings, the machine, the step budget) and `.json` (the same numbers and settings),
atomically (`mdregnet.io.atomic_write`).
"""

import json
import math
import os
import platform
import shlex
import sys
import time

import numpy as np

from mdregnet import infer, io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")


def machine():
    """One line describing the host: CPU model, logical CPUs, load, Python/TF/Keras versions."""
    import keras
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    try:
        load = ", load average %.1f at start" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{model}, {os.cpu_count()} logical CPUs{load}, "
            f"{'GPU ' + gpus[0].name if gpus else 'no GPU'}; Python "
            f"{platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}")


def parse_floats(values, name):
    """A list of floats from a flag's list of strings (ValueError naming the flag)."""
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name} must be numbers, got {values}") from None


def parse_ints(values, name):
    """A tuple of ints from a flag's list of strings (ValueError naming the flag)."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be integers, got {values}") from None


def train_variant(name, shape, hparams, batches, steps, lr=1e-4, seed=0, log=print,
                  log_every=50, label=None):
    """Builds `name` with `hparams` and trains it on `batches` for `steps` Adam steps.

    Args:
        name: registered model name; shape: its spatial input size.
        hparams: overrides of the model's defaults.
        batches: iterator of `(moving, fixed)` float32 arrays `(B, *shape, 1)`.
        steps: number of steps (>= 0).
        lr: Adam learning rate.
        seed: `keras.utils.set_random_seed` before the weights are created.
        log: callable taking one line of progress.
        log_every: steps between progress lines.
        label: the variant's name in the progress lines (default `name`).

    Returns:
        `(model, info)`: the trained model and a dict with 'steps', 'loss_history' (list of
        [step, mean loss over the window]), 'final_loss', 'seconds' (all steps),
        'seconds_per_step' (excluding the first step, which traces the graph) and 'parameters'.

    Raises:
        FloatingPointError: the loss became NaN or Inf.
    """
    import keras
    import tensorflow as tf

    from mdregnet import models
    from mdregnet.train import make_train_step

    label = label or name
    keras.utils.set_random_seed(seed)
    model = models.build(name, shape, **hparams)
    loss_fn = models.objective(model)
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    step_fn = make_train_step(model, loss_fn, optimizer, tf.distribute.get_strategy())
    history, window = [], []
    started = time.perf_counter()
    first_done = None
    for step in range(1, steps + 1):
        moving, fixed = next(batches)
        total, _ = step_fn((tf.constant(moving, tf.float32), tf.constant(fixed, tf.float32)))
        window.append(float(total))
        if first_done is None:
            first_done = time.perf_counter()
        if step % log_every == 0 or step == steps:
            mean = float(np.mean(window))
            window = []
            if not math.isfinite(mean):
                raise FloatingPointError(f"{label}: the loss is {mean} at step {step}")
            history.append([step, mean])
            rate = ((time.perf_counter() - first_done) / (step - 1)) if step > 1 else float("nan")
            log(f"{label}: step {step}/{steps} loss {mean:.5f} ({rate:.2f} s/step)")
    seconds = time.perf_counter() - started
    per_step = ((time.perf_counter() - first_done) / (steps - 1)) if steps > 1 else None
    info = {"steps": int(steps), "loss_history": history,
            "final_loss": history[-1][1] if history else None, "seconds": seconds,
            "seconds_per_step": per_step,
            "parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))}
    return model, info


def cpu_budget_sentence(steps, paper_steps, extra=""):
    """The sentence every table carries: how far below the paper's budget this run is."""
    return (f"**CPU budget**: {steps} training steps per variant, far below the paper's "
            f"{paper_steps}{extra}; the numbers show the direction of each ablation at this "
            "budget and are not a reproduction of the paper's values.")


def fmt(value, digits=4):
    """A number for a table cell ('n/a' for None or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def fmt_stat(stat, digits=4):
    """'mean ± std' of an `evaluate._stat`-like dict."""
    if not stat or stat.get("n", 0) == 0:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def stat(values):
    """mean, std (ddof=1; 0 for one value), n of the finite values."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0, "n": int(values.size)}


def markdown_table(header, rows):
    """A Markdown table from a header list and rows of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(argv=None):
    """The command as run (`python experiments/x.py --flag ...`)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]) and argv[0].startswith(REPO + os.sep):
        argv[0] = os.path.relpath(argv[0], REPO)
    return "python " + shlex.join(argv)


def write_report(out_dir, name, markdown, payload):
    """Writes `ablation_<name>.md` and `ablation_<name>.json` into `out_dir` (created).

    Returns:
        `(md_path, json_path)`.
    """
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"ablation_{name}.md")
    json_path = os.path.join(out_dir, f"ablation_{name}.json")
    text = json.dumps(infer.jsonable(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    for path, content in ((md_path, markdown), (json_path, text)):
        def write(tmp, content=content):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)

        io.atomic_write(path, write)
    return md_path, json_path


def timestamp():
    return time.strftime("%Y-%m-%d %H:%M:%S")


def write_json(path, value):
    """Writes `value` as JSON to `path` (folders created), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(infer.jsonable(value), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    io.atomic_write(path, write)


def resolve(path):
    """A relative path taken from the repository root (so the scripts run from anywhere)."""
    return path if path is None or os.path.isabs(path) else os.path.join(REPO, path)


def absl_main(script, run_from_flags, flag_values):
    """`main(argv)` for `absl.app.run` of an ablation script: no positional arguments; missing
    data, bad settings or an unwritable output (OSError, ValueError: `DataMissingError`,
    `io.InvalidInputError`, ...) end it with one line `<script>: error: <reason>` and status 1.

    Args:
        script: the script's name for that line, e.g. 'ablation_mdregnet'.
        run_from_flags: its `run_from_flags(flag_values, argv)`.
        flag_values: its absl `FLAGS`.
    """
    from absl import app

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            run_from_flags(flag_values, sys.argv)
        except (OSError, ValueError) as err:
            sys.exit(f"{script}: error: {err}")

    return main
