"""The paper's evaluation protocol, every subject registered to one template: `python -m
mdregnet.evaluate`.

    python -m mdregnet.evaluate --model runs/mdregnet --data_dir work_data/malc \
        [--subjects test.txt] [--template_seed 0] [--refine_steps 50] --out results/eval_malc

Protocol (MDReg-Net, "Evaluation Metrics"; CONVENTIONS.md, Metrics): one template chosen at random
(seeded) is the FIXED image and every other subject is MOVING. The model's displacement `disp`
warps the moving label map (nearest neighbour) onto the template, and per-label Dice is computed
over the template's labels (background excluded) with their mean. The Jacobian determinant of the
deformation gives the folding voxels (det <= 0), counted over the grid and inside the template's
brain mask (labels > 0), and SDlogJ. The time per pair is the model call alone, after one
warm-up call. For diffeomorphic models the opposite direction (paper Table 3) is evaluated from
the same velocity field: the template's labels warped by `inverse_disp` onto the moving subject,
Dice against the moving subject's labels, folding inside its brain mask.

With `--refine_steps N` (N > 0, diffeomorphic models only), each pair's velocity field is first
refined by N Adam steps on the model's own loss (`mdregnet.refine`, the FCN paper's "optimization
of spatial transformation ... with the backpropagation computation"); every metric then comes from
the refined field, and the time per pair includes the refinement.

`data_dir` is a preprocessed dataset: `images/<id>.nii.gz` and `labels/<id>.nii.gz` on one grid.

Outputs in `--out`, each written atomically:
    dice_per_pair.csv   one row per moving subject: Dice (forward, before registration, inverse),
                        folding count and %, over the grid and in the brain mask, SDlogJ, time
    dice_per_label.csv  one row per (moving subject, label): Dice forward and inverse
    summary.md          Markdown table of mean +- std over pairs, with the model and settings
    summary.json        the same numbers, per-label means, and the settings
"""

import csv
from io import StringIO
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from mdregnet import data, infer, io, metrics, refine

FLAGS = flags.FLAGS

#: Columns of dice_per_pair.csv (the inverse ones only for diffeomorphic models).
PAIR_COLUMNS = ("moving_id", "fixed_id", "dice_mean", "dice_before", "n_labels",
                "folding_count", "folding_percent", "folding_count_in_mask",
                "folding_percent_in_mask", "sdlogj", "sdlogj_in_mask", "time_s")
INVERSE_COLUMNS = ("inverse_dice_mean", "inverse_dice_before", "inverse_n_labels",
                   "inverse_folding_count", "inverse_folding_percent",
                   "inverse_folding_count_in_mask", "inverse_folding_percent_in_mask",
                   "inverse_sdlogj", "inverse_sdlogj_in_mask")

#: Per-pair metrics summarised (mean, std over pairs) in summary.json/.md, per direction.
_SUMMARISED = ("dice_mean", "dice_before", "folding_count", "folding_percent",
               "folding_count_in_mask", "folding_percent_in_mask", "sdlogj", "sdlogj_in_mask")


def define_flags(flag_values=FLAGS):
    """Defines the command-line flags on `flag_values`.

    Called by `python -m mdregnet.evaluate` (and by tests on a fresh `flags.FlagValues()`), not on
    import, so the package's apps can import each other without clashing flag names.
    """
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", None, "Model directory written by mdregnet.models.save.", **fv)
    flags.DEFINE_string("data_dir", None, "Preprocessed dataset: images/<id>.nii.gz and "
                        "labels/<id>.nii.gz.", **fv)
    flags.DEFINE_string("subjects", None, "Optional file listing the subject ids to use, one per "
                        "line ('#' starts a comment); default every subject in data_dir.", **fv)
    flags.DEFINE_integer("template_seed", 0, "Seed of the random choice of the template among the "
                         "sorted subject ids.", **fv)
    flags.DEFINE_string("template_id", None, "Use this subject as the template instead of a random "
                        "one.", **fv)
    flags.DEFINE_integer("max_subjects", None, "Evaluate only the first N moving subjects.", **fv)
    flags.DEFINE_boolean("inverse", True, "Also evaluate the opposite direction (template labels "
                         "warped by inverse_disp) for diffeomorphic models.", **fv)
    flags.DEFINE_string("out", None, "Output directory (created).", **fv)
    flags.DEFINE_integer("refine_steps", 0, "Test-time refinement of each pair's velocity field: "
                         "Adam steps on the model's own loss (mdregnet.refine); 0 = off.",
                         lower_bound=0, **fv)
    flags.DEFINE_float("refine_lr", None, "Adam step size of the refinement, voxels of the "
                       "velocity grid (default mdregnet.refine.DEFAULT_LR).", **fv)
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"],
                      "cpu hides every GPU; gpu fails when none is visible.", **fv)


# ------------------------------------------------------------------------------------------------
# Protocol
# ------------------------------------------------------------------------------------------------
def choose_template(ids, template_seed=0, template_id=None):
    """The template's id: `template_id` if given, else `sorted(ids)[rng.integers(N)]` with
    `rng = numpy.random.default_rng(template_seed)` (independent of the order of `ids`)."""
    ids = [str(i) for i in ids]
    if template_id is not None:
        if str(template_id) not in ids:
            raise ValueError(f"template_id {template_id!r} is not one of the {len(ids)} subjects")
        return str(template_id)
    if not ids:
        raise ValueError("no subjects to choose a template from")
    rng = np.random.default_rng(template_seed)
    return sorted(ids)[int(rng.integers(len(ids)))]


def _direction_metrics(prefix, target_labels, warped_labels, source_labels, disp):
    """Dice (target vs warped, and vs unwarped source), folding and SDlogJ of one direction."""
    per_label, mean = metrics.dice(target_labels, warped_labels)
    _, before = metrics.dice(target_labels, source_labels)
    brain = target_labels > 0
    has_mask = bool(np.any(brain))
    fold = metrics.folding(disp, mask=brain if has_mask else None)
    row = {
        f"{prefix}dice_mean": mean,
        f"{prefix}dice_before": before,
        f"{prefix}n_labels": len(per_label),
        f"{prefix}folding_count": fold["count"],
        f"{prefix}folding_percent": fold["percent"],
        f"{prefix}folding_count_in_mask": fold.get("count_in_mask", float("nan")),
        f"{prefix}folding_percent_in_mask": fold.get("percent_in_mask", float("nan")),
        f"{prefix}sdlogj": metrics.sd_log_jacobian(disp),
        f"{prefix}sdlogj_in_mask": (metrics.sd_log_jacobian(disp, mask=brain) if has_mask
                                    else float("nan")),
    }
    return row, per_label


def evaluate(model, images, labels, ids, template_seed=0, template_id=None, inverse=True,
             max_subjects=None, refine_steps=0, refine_lr=None):
    """Registers every subject to one template and measures Dice, folding, SDlogJ and time.

    Args:
        model: a model from `mdregnet.models.build`/`load`, or a directory written by
            `models.save`. It is rebuilt for the images' grid when that grid differs from its
            input shape (sizes divisible by its factor), else the images are zero-padded to the
            next multiple and the fields cropped back (`infer.fit_model`).
        images: `(N, X, Y, Z)` float32 in [0, 1] (e.g. `data.load_cohort`), one grid.
        labels: `(N, X, Y, Z)` integer label maps of the same subjects.
        ids: the N subject ids.
        template_seed: seed of the template choice (`choose_template`).
        template_id: the template's id, overriding the random choice.
        inverse: also evaluate the opposite direction when the model has 'inverse_disp'.
        max_subjects: evaluate only the first this many moving subjects (in `ids` order).
        refine_steps: when > 0, refine each pair's velocity field by this many Adam steps on the
            model's own loss (`mdregnet.refine`) before the metrics; its time is in 'time_s'.
        refine_lr: the refinement's Adam step size (voxels); None: `refine.DEFAULT_LR`.

    Returns:
        `(rows, summary)`. `rows`: one dict per moving subject with the `PAIR_COLUMNS` (and
        `INVERSE_COLUMNS` for the opposite direction) plus 'dice_per_label' (and
        'inverse_dice_per_label'), dicts label -> Dice. `summary`: the model and settings, and per
        direction the mean/std over pairs of every metric (see `summarise`).

    Raises:
        ValueError: mismatched lengths or shapes, fewer than 2 subjects, an unknown template, or
            `refine_steps > 0` for a model without a velocity field.
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    ids = [str(i) for i in ids]
    if images.ndim != 4 or labels.shape != images.shape or len(ids) != images.shape[0]:
        raise ValueError(f"need images and labels (N, X, Y, Z) of one shape and N ids; got images "
                         f"{images.shape}, labels {labels.shape}, {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("subject ids must be unique")
    if len(ids) < 2:
        raise ValueError(f"need a template and at least one moving subject; got {len(ids)}")
    template = choose_template(ids, template_seed, template_id)
    t = ids.index(template)
    moving_idx = [i for i in range(len(ids)) if i != t]
    if max_subjects is not None:
        moving_idx = moving_idx[:max(0, int(max_subjects))]

    shape = images.shape[1:]
    fitted, pad, fit_note = infer.fit_model(model, shape)
    config = fitted.mdregnet_config
    fixed, fixed_labels = images[t], labels[t]

    # Warm-up: builds the graph and compiles the XLA warps (and one refinement step, which traces
    # the refinement's functions), so the times below are the model's.
    if moving_idx:
        infer.predict(fitted, images[moving_idx[0]], fixed, pad, min(refine_steps, 1), refine_lr)

    rows = []
    use_inverse = False
    for i in moving_idx:
        outputs, seconds = infer.predict(fitted, images[i], fixed, pad, refine_steps, refine_lr)
        disp = outputs["disp"]
        warped = infer.warp_labels(labels[i], disp)
        row = {"moving_id": ids[i], "fixed_id": template}
        forward, per_label = _direction_metrics("", fixed_labels, warped, labels[i], disp)
        row.update(forward)
        row["time_s"] = seconds
        row["dice_per_label"] = per_label
        if inverse and "inverse_disp" in outputs:
            use_inverse = True
            inv = outputs["inverse_disp"]
            warped_template = infer.warp_labels(fixed_labels, inv)
            backward, inv_per_label = _direction_metrics("inverse_", labels[i], warped_template,
                                                         fixed_labels, inv)
            row.update(backward)
            row["inverse_dice_per_label"] = inv_per_label
        rows.append(row)

    notes = [fit_note] if fit_note else []
    if inverse and not use_inverse and rows:
        notes.append(f"model {config['name']!r} has no inverse_disp: opposite direction skipped")
    settings = {
        "model": {"name": config["name"], "hparams": config["hparams"],
                  "input_shape": config["input_shape"],
                  "directory": infer.model_config(model)[1]},
        "template_id": template,
        "template_seed": None if template_id is not None else int(template_seed),
        "n_subjects": len(ids),
        "n_pairs": len(rows),
        "shape": [int(n) for n in shape],
        "opposite_direction": use_inverse,
        "padding": None if not any(b or a for b, a in pad) else [list(p) for p in pad],
        "device": infer._device_name(),
        "refine": None if not refine_steps else {
            "steps": int(refine_steps),
            "lr": refine.DEFAULT_LR if refine_lr is None else float(refine_lr)},
        "notes": notes,
    }
    return rows, summarise(rows, settings)


def _stat(values):
    """mean, std (ddof=1; 0 for one value), min, max, n over the finite values."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    return {"mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def summarise(rows, settings):
    """Summary dict: `settings` plus, per direction ('forward', and 'inverse' when
    `settings['opposite_direction']`), `_stat` of each metric over the pairs, the number of pairs
    with any folding and 'per_label' Dice statistics; and 'time_s' over the pairs."""
    summary = dict(settings)
    directions = [("forward", "")] + ([("inverse", "inverse_")]
                                      if settings.get("opposite_direction") else [])
    for name, prefix in directions:
        part = {key: _stat([row[prefix + key] for row in rows]) for key in _SUMMARISED}
        part["pairs_with_folding"] = int(sum(row[prefix + "folding_count"] > 0 for row in rows))
        per_label = {}
        for row in rows:
            for label, value in row[prefix + "dice_per_label"].items():
                per_label.setdefault(int(label), []).append(value)
        part["per_label"] = {label: _stat(values) for label, values in sorted(per_label.items())}
        summary[name] = part
    summary["time_s"] = _stat([row["time_s"] for row in rows])
    return summary


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _csv_text(header, records):
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for record in records:
        writer.writerow(["" if v is None or (isinstance(v, float) and not np.isfinite(v)) else
                         (f"{v:.6g}" if isinstance(v, float) else v) for v in record])
    return buffer.getvalue()


def _fmt(stat, digits=3):
    if not stat or stat["n"] == 0:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summary_markdown(summary):
    """The Markdown report: settings, then mean ± std over pairs per direction."""
    model = summary["model"]
    hp = model["hparams"]
    inverse = summary.get("inverse")
    lines = [
        f"# Evaluation of `{model['name']}`",
        "",
        f"- model: `{model['name']}` from `{model.get('directory')}`, input shape "
        f"{tuple(model['input_shape'])}",
        "- hyper-parameters: " + ", ".join(f"{k}={hp[k]}" for k in sorted(hp)),
        f"- subjects: {summary['n_subjects']} on a grid of {tuple(summary['shape'])}; template "
        f"`{summary['template_id']}` (" + (f"seed {summary['template_seed']}"
                                            if summary["template_seed"] is not None else "given")
        + f"); {summary['n_pairs']} moving subjects",
        f"- device: {summary['device']}",
    ]
    if summary.get("refine"):
        lines.append(f"- test-time refinement: {summary['refine']['steps']} Adam steps (lr "
                     f"{summary['refine']['lr']:g} voxels) on each pair's velocity field with the "
                     "model's own loss; the time per pair includes it")
    lines += [f"- note: {note}" for note in summary["notes"]]
    lines += [
        "",
        "Mean ± std over pairs. Forward: each subject's labels warped onto the template by "
        "`disp`; inverse: the template's labels warped onto each subject by `inverse_disp` (same "
        "velocity field). Folding: voxels with det(I + grad u) <= 0; brain mask = target "
        "labels > 0.",
        "",
        "| metric | forward (subject → template) | inverse (template → subject) |",
        "| --- | --- | --- |",
    ]
    rows = [("Dice", "dice_mean", 3), ("Dice before registration", "dice_before", 3),
            ("folding voxels (grid)", "folding_count", 1),
            ("folding % (grid)", "folding_percent", 4),
            ("folding voxels (brain mask)", "folding_count_in_mask", 1),
            ("folding % (brain mask)", "folding_percent_in_mask", 4),
            ("SDlogJ (grid)", "sdlogj", 4), ("SDlogJ (brain mask)", "sdlogj_in_mask", 4)]
    for title, key, digits in rows:
        inv = _fmt(inverse[key], digits) if inverse else "n/a"
        lines.append(f"| {title} | {_fmt(summary['forward'][key], digits)} | {inv} |")
    inv_folded = inverse["pairs_with_folding"] if inverse else "n/a"
    lines.append(f"| pairs with folding | {summary['forward']['pairs_with_folding']} of "
                 f"{summary['n_pairs']} | {inv_folded} |")
    lines.append(f"| time per pair (s) | {_fmt(summary['time_s'], 3)} | (same model call) |")
    return "\n".join(lines) + "\n"


REPORT_FILES = ("dice_per_pair.csv", "dice_per_label.csv", "summary.md", "summary.json")


def write_report(out_dir, rows, summary):
    """Writes dice_per_pair.csv, dice_per_label.csv, summary.md and summary.json, all or none.

    The four files are written (each through `io.atomic_write`) into a temporary folder beside
    `out_dir` and then moved in: a failure at any point (a full disk, an unwritable folder)
    leaves none of them, and no temporary file, behind; a folder this call created is removed.

    Returns:
        dict file name -> final path.

    Raises:
        OSError: `out_dir` is not a writable folder or a file cannot be written; the message
            names the final path.
    """
    inverse = bool(summary.get("opposite_direction"))
    columns = PAIR_COLUMNS + (INVERSE_COLUMNS if inverse else ())
    pair_csv = _csv_text(columns, [[row.get(c) for c in columns] for row in rows])

    label_columns = ("moving_id", "fixed_id", "label", "dice") + (("dice_inverse",) if inverse
                                                                  else ())
    records = []
    for row in rows:
        forward = row["dice_per_label"]
        backward = row.get("inverse_dice_per_label", {})
        for label in sorted(set(forward) | set(backward)):
            record = [row["moving_id"], row["fixed_id"], int(label), forward.get(label)]
            if inverse:
                record.append(backward.get(label))
            records.append(record)
    label_csv = _csv_text(label_columns, records)
    json_text = json.dumps(infer.jsonable(summary), indent=2, sort_keys=True,
                           allow_nan=False) + "\n"
    texts = {"dice_per_pair.csv": pair_csv, "dice_per_label.csv": label_csv,
             "summary.md": summary_markdown(summary), "summary.json": json_text}
    out_dir = os.path.abspath(os.fspath(out_dir))
    io.check_output_dir(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as err:
        raise OSError(err.errno, f"{out_dir}: cannot create the output folder "
                                 f"({err.strerror or err})") from err
    try:
        for name, text in texts.items():
            def write(tmp, text=text):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)

            io.atomic_write(os.path.join(staging, name), write)
        io.publish_files(staging, out_dir, list(texts))
    except BaseException as err:
        relocated = io.relocated_error(err, staging, out_dir) if isinstance(err, Exception) \
            else err
        if relocated is err:
            raise
        raise relocated from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: os.path.join(out_dir, name) for name in texts}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run_from_flags(fv=FLAGS):
    """The command line's work, reading parsed flags `fv`; returns `(rows, summary, paths)`."""
    for name in ("model", "data_dir", "out"):
        if not fv[name].value:
            raise app.UsageError(f"--{name} is required")
    io.check_output_dir(fv.out)  # fail now, not after every pair has been registered
    infer.set_device(fv.device)
    subjects = data.find_subjects(os.path.join(fv.data_dir, "images"),
                                  os.path.join(fv.data_dir, "labels"), subjects=fv.subjects)
    started = time.perf_counter()
    images, labels, _ = data.load_cohort(subjects, with_labels=True)
    ids = [s.id for s in subjects]
    print(f"loaded {len(ids)} subjects of shape {images.shape[1:]} from {fv.data_dir} in "
          f"{time.perf_counter() - started:.1f} s")
    rows, summary = evaluate(fv.model, images, labels, ids, template_seed=fv.template_seed,
                             template_id=fv.template_id, inverse=fv.inverse,
                             max_subjects=fv.max_subjects, refine_steps=fv.refine_steps,
                             refine_lr=fv.refine_lr)
    summary["data_dir"] = os.path.abspath(fv.data_dir)
    summary["subjects_file"] = fv.subjects
    paths = write_report(fv.out, rows, summary)
    print(summary_markdown(summary))
    print(f"outputs in {os.path.abspath(fv.out)}:")
    for path in paths.values():
        print(f"  {path}")
    return rows, summary, paths


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run_from_flags(FLAGS)
    except (OSError, ValueError) as err:  # io.InvalidInputError is a ValueError
        sys.exit(f"mdregnet.evaluate: error: {' '.join(str(err).split())}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
