"""Dice and folding versus test-time refinement steps (`mdregnet.refine`) on validation pairs.

    python experiments/refine_curve.py [--model mdregnet/pretrained/mdregnet_ixi2mm] \
        [--data_dir work_data/ixi_2mm] [--subjects experiments/splits/ixi_val.txt] \
        [--template_seed 0] [--max_pairs 5] [--steps 0,5,10,20,40] [--lr 0.1] \
        [--out results/refine_curve]

The protocol of `mdregnet.evaluate` (seeded template as fixed, the first `--max_pairs` other
subjects moving). Each pair is refined once for max(--steps) steps; at every listed step the
current displacement warps the moving labels (nearest neighbour) and gives the mean Dice over the
template's labels, the folding voxels (det(I + grad u) <= 0) and the elapsed time since the
network was called for the pair (its forward pass plus the Adam steps so far; the time spent
measuring is subtracted). Writes `curve.csv` (pair, step, dice, folding, seconds) and `curve.md` (mean over
pairs per step), atomically, and prints the table.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

from mdregnet import data, evaluate, infer, io, metrics, refine

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("model", "mdregnet/pretrained/mdregnet_ixi2mm", "Saved model directory.",
                        **fv)
    flags.DEFINE_string("data_dir", "work_data/ixi_2mm", "Preprocessed dataset.", **fv)
    flags.DEFINE_string("subjects", "experiments/splits/ixi_val.txt", "Subject ids file.", **fv)
    flags.DEFINE_integer("template_seed", 0, "Seed of the template choice.", **fv)
    flags.DEFINE_integer("max_pairs", 5, "Number of moving subjects.", **fv)
    flags.DEFINE_list("steps", ["0", "5", "10", "20", "40"], "Steps at which to measure.", **fv)
    flags.DEFINE_float("lr", refine.DEFAULT_LR, "Adam step size (voxels).", **fv)
    flags.DEFINE_string("out", "results/refine_curve", "Output directory.", **fv)


def curve(model_dir, images, labels, ids, steps, lr=refine.DEFAULT_LR, template_seed=0,
          max_pairs=5, log=print):
    """Rows `{pair, step, dice, folding_count, seconds}` for each moving subject and step.

    Args:
        model_dir: saved diffeomorphic model (`models.save`).
        images, labels: `(N, X, Y, Z)` cohort (`data.load_cohort`); ids: the N subject ids.
        steps: increasing step counts to measure at (0 = the network alone).
        lr, template_seed, max_pairs: as the flags.

    Raises:
        ValueError: a model without a velocity field; bad inputs (as `evaluate.evaluate`).
    """
    steps = sorted({int(k) for k in steps})
    template = evaluate.choose_template(ids, template_seed)
    t = ids.index(template)
    moving_idx = [i for i in range(len(ids)) if i != t][:max_pairs]
    model, pad, _ = infer.fit_model(model_dir, images.shape[1:])
    fixed = infer.pad_volume(images[t], pad)[None, ..., None]
    # Warm-up (tracing, XLA compilation) outside the timings.
    refine.refine(model, infer.pad_volume(images[moving_idx[0]], pad)[None, ..., None], fixed, 1,
                  lr=lr)
    rows = []
    for i in moving_idx:
        moving = infer.pad_volume(images[i], pad)[None, ..., None]
        spent = [0.0]
        start = time.perf_counter()

        def measure(k, outputs, i=i, spent=spent, start=start):
            if k not in steps:
                return
            t0 = time.perf_counter()
            disp = infer.crop_volume(np.asarray(outputs["disp"])[0], pad)
            _, dice = metrics.dice(labels[t], infer.warp_labels(labels[i], disp))
            fold = metrics.folding(disp)["count"]
            rows.append({"pair": ids[i], "step": k, "dice": dice, "folding_count": fold,
                         "seconds": t0 - start - spent[0]})
            spent[0] += time.perf_counter() - t0

        refine.refine(model, moving, fixed, steps[-1], lr=lr, callback=measure)
        last = rows[-1]
        log(f"{ids[i]}: Dice {rows[-len(steps)]['dice']:.4f} -> {last['dice']:.4f} after "
            f"{last['step']} steps ({last['seconds']:.1f} s), folding {last['folding_count']}")
    return rows


def table(rows):
    """Markdown: per step, mean Dice, mean folding voxels and mean seconds over the pairs."""
    lines = ["| refinement steps | Dice mean | folding voxels mean | seconds per pair |",
             "| --- | --- | --- | --- |"]
    for step in sorted({r["step"] for r in rows}):
        sel = [r for r in rows if r["step"] == step]
        lines.append(f"| {step} | {np.mean([r['dice'] for r in sel]):.4f} | "
                     f"{np.mean([r['folding_count'] for r in sel]):.1f} | "
                     f"{np.mean([r['seconds'] for r in sel]):.1f} |")
    return "\n".join(lines) + "\n"


def _write(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    io.atomic_write(path, write)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    subjects = data.find_subjects(os.path.join(FLAGS.data_dir, "images"),
                                  os.path.join(FLAGS.data_dir, "labels"), subjects=FLAGS.subjects)
    images, labels, _ = data.load_cohort(subjects, with_labels=True)
    rows = curve(FLAGS.model, images, labels, [s.id for s in subjects], FLAGS.steps, FLAGS.lr,
                 FLAGS.template_seed, FLAGS.max_pairs)
    os.makedirs(FLAGS.out, exist_ok=True)
    header = ["pair", "step", "dice", "folding_count", "seconds"]
    _write(os.path.join(FLAGS.out, "curve.csv"),
           ",".join(header) + "\n" + "".join(",".join(str(r[k]) for k in header) + "\n"
                                              for r in rows))
    text = table(rows)
    pairs = len({r["pair"] for r in rows})
    _write(os.path.join(FLAGS.out, "curve.md"),
           f"Test-time refinement of `{FLAGS.model}` (lr {FLAGS.lr}) on {pairs} validation "
           f"pairs.\n\n{text}\nCommand: `python {' '.join(sys.argv)}`\n")
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
