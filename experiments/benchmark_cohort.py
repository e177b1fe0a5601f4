"""Benchmark of cohort mode: subjects per second for several batch sizes (`mdregnet.cohort`).

Writes N synthetic subjects (smooth ellipsoid 'brains' with 32 labels, on one grid; default
80x112x80, the shipped models' 2 mm grid) and an atlas into a temporary folder, then for each
batch size builds a `CohortRegistration` (model loading, timed apart), traces it with `warm_up`
(timed apart), and times `run` over the N subjects (the fastest of `--repeats` runs): reading
and normalising (tf.data), the batched model call, Jacobian, label warp, Dice and writing every
subject folder and the CSV. Prints a table (and optionally JSON). Not a test: numbers depend on
the machine and its load.

    python experiments/benchmark_cohort.py --n 8 --batch_sizes 1,2,4 [--model DIR] \
        [--mode atlas|to_template] [--out runs/bench_cohort.json]

(`--out X.json` also writes the printed table to `X.md`.)

On a real preprocessed cohort instead (e.g. `make prepare-ixi`'s output: images/ and labels/ on
one grid), the first subject (or `--atlas` / `--atlas_labels`) is the atlas (template) and the
other subjects, `--n` at most, are registered:

    python experiments/benchmark_cohort.py --images work_data/ixi_2mm/images \
        --labels work_data/ixi_2mm/labels --n 19 --batch_sizes 1,2,4

The model defaults to the shipped `mdregnet/pretrained/mdregnet_ixi2mm` when it exists, else an
untrained `models.build('mdregnet', shape)` (the same network, so the same cost). The issue's
target is 3 subjects/s on a 2-core CPU at 2 mm; to emulate fewer cores on a larger machine, run
under `taskset -c 0,1`.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from mdregnet import cohort, infer, models

TARGET_RATE = 3.0  # subjects/s, 2-core CPU, 2 mm (the target)
AFFINE_2MM = np.array([[2.0, 0, 0, -80], [0, 2.0, 0, -112], [0, 0, 2.0, -70], [0, 0, 0, 1]])


def synthetic_subject(shape, shift, seed):
    """An ellipsoid 'brain' with 32 labels (8 octants x 4 shells), intensities in [0, 1]."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2.0 + np.array(shift)
    radius = np.array(shape) * 0.4
    r2 = sum(((grid[a] - centre[a]) / radius[a]) ** 2 for a in range(3))
    inside = r2 < 1.0
    octant = (grid[0] > centre[0]) + 2 * (grid[1] > centre[1]) + 4 * (grid[2] > centre[2])
    shell = np.minimum((np.sqrt(r2) * 4).astype(np.int32), 3)
    labels = np.where(inside, 1 + octant * 4 + shell, 0).astype(np.int32)
    image = np.where(inside, 0.3 + 0.02 * labels, 0.0) + 0.03 * rng.random(shape)
    image = ndimage.gaussian_filter(image, 1.0)
    return (image / image.max()).astype(np.float32), labels


def write_cohort(folder, shape, n):
    """Atlas, N subjects and their labels in `folder`; returns (atlas, atlas_labels, subjects)."""
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "labels"))

    def save(path, array):
        nib.save(nib.Nifti1Image(array, AFFINE_2MM), path)
        return path

    image, labels = synthetic_subject(shape, (0.0, 0.0, 0.0), seed=0)
    atlas = save(os.path.join(folder, "atlas.nii.gz"), image)
    atlas_labels = save(os.path.join(folder, "atlas_seg.nii.gz"), labels)
    rng = np.random.default_rng(1)
    for k in range(n):
        image, labels = synthetic_subject(shape, tuple(rng.normal(0.0, 2.0, 3)), seed=k + 1)
        save(os.path.join(folder, "images", f"sub{k:04d}.nii.gz"), image)
        save(os.path.join(folder, "labels", f"sub{k:04d}_seg.nii.gz"), labels)
    subjects = cohort.find_cohort(os.path.join(folder, "images"), os.path.join(folder, "labels"))
    return atlas, atlas_labels, subjects


def real_cohort(args):
    """(atlas, atlas_labels, subjects) of a real cohort folder (`--images`, `--labels`)."""
    subjects = cohort.find_cohort(args.images, args.labels)
    if args.atlas is None:
        if len(subjects) < 2:
            raise SystemExit(f"{args.images}: at least 2 subjects are needed (atlas + 1)")
        first, subjects = subjects[0], subjects[1:]
        atlas, atlas_labels = first.image, first.labels
    else:
        atlas, atlas_labels = args.atlas, args.atlas_labels
    if args.mode == cohort.ATLAS and atlas_labels is None:
        raise SystemExit("atlas mode needs atlas labels (--labels, or --atlas_labels)")
    return atlas, atlas_labels, subjects[:args.n]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="saved model directory (default: the "
                        "shipped model, else an untrained mdregnet)")
    parser.add_argument("--n", type=int, default=8, help="number of subjects")
    parser.add_argument("--batch_sizes", default="1,2,4")
    parser.add_argument("--shape", default="80,112,80", help="grid X,Y,Z (2 mm voxels)")
    parser.add_argument("--mode", default=cohort.ATLAS, choices=cohort.MODES)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per batch size; the fastest is reported")
    parser.add_argument("--images", default=None, help="folder of a real preprocessed cohort "
                        "(default: a synthetic one)")
    parser.add_argument("--labels", default=None, help="its label maps (with --images)")
    parser.add_argument("--atlas", default=None, help="atlas image (with --images; default: the "
                        "first subject, which is then left out of the subjects)")
    parser.add_argument("--atlas_labels", default=None, help="atlas labels (with --atlas)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.images is None and (args.labels or args.atlas or args.atlas_labels):
        parser.error("--labels, --atlas and --atlas_labels go with --images")
    if args.atlas is not None and args.labels is not None and args.atlas_labels is None:
        parser.error("--atlas with --labels needs --atlas_labels")
    shape = tuple(int(s) for s in args.shape.split(","))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    model = args.model
    if model is None and os.path.isfile(os.path.join(infer.PRETRAINED_DIR, "config.json")):
        model = infer.PRETRAINED_DIR
    model_name = model or f"untrained mdregnet {shape} (no shipped model found)"
    if model is None:
        model = models.build("mdregnet", shape)

    rows = []
    with tempfile.TemporaryDirectory(prefix="mdregnet_bench_cohort_") as tmp:
        if args.images is None:
            atlas, atlas_labels, subjects = write_cohort(os.path.join(tmp, "data"), shape, args.n)
            cohort_name = f"{args.n} synthetic subjects"
        else:
            atlas, atlas_labels, subjects = real_cohort(args)
            shape = tuple(int(n) for n in nib.load(atlas).shape[:3])
            cohort_name = f"{len(subjects)} subjects of {args.images}"
        for batch_size in batch_sizes:
            t0 = time.perf_counter()
            # Mode 'to_template': the atlas is the template and its labels the fixed labels.
            registration = cohort.CohortRegistration(model, atlas, atlas_labels, mode=args.mode,
                                                     batch_size=batch_size)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            registration.warm_up()
            trace_s = time.perf_counter() - t0
            # The faster of `--repeats` runs (fresh output folders): one run in a few stalls
            # about 2 s in the input pipeline, once per process, which a short cohort feels.
            report = None
            for repeat in range(args.repeats):
                run = registration.run(subjects,
                                       os.path.join(tmp, f"out_b{batch_size}_r{repeat}"),
                                       log=lambda line: None)
                if report is None or run.seconds < report.seconds:
                    report = run
            if report.n_failed:
                raise RuntimeError(f"{report.n_failed} subjects failed: {report.failed}")
            model_s = float(np.mean([row["time_s"] for row in report.rows]))
            rows.append({"batch_size": batch_size, "subjects": len(subjects),
                         "repeats": args.repeats,
                         "subjects_per_s": report.rate, "seconds": report.seconds,
                         "model_call_s_per_subject": model_s, "load_s": load_s,
                         "trace_s": trace_s})
            print(f"batch {batch_size}: {report.rate:.3f} subjects/s", flush=True)

    best = max(row["subjects_per_s"] for row in rows)
    lines = [
        f"cohort mode '{args.mode}', {cohort_name}, {'x'.join(map(str, shape))}, "
        f"model: {model_name}; {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), "
        f"{infer._device_name()}; model load and first-call tracing excluded; "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        "",
        "| batch | subjects/s | s/subject | model call s/subject | load s | trace s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['batch_size']} | {row['subjects_per_s']:.3f} | "
                     f"{1.0 / row['subjects_per_s']:.3f} | {row['model_call_s_per_subject']:.3f} | "
                     f"{row['load_s']:.1f} | {row['trace_s']:.1f} |")
    lines += ["", f"best {best:.3f} subjects/s; target {TARGET_RATE:g} subjects/s (2-core CPU, "
              "2 mm): " + ("met" if best >= TARGET_RATE else "NOT met")]
    print("\n" + "\n".join(lines))
    if args.out:
        result = {"mode": args.mode, "cohort": cohort_name, "atlas": atlas,
                  "shape": list(shape), "model": model_name,
                  "cpus": os.cpu_count(), "device": infer._device_name(),
                  "platform": platform.platform(), "rows": rows, "target": TARGET_RATE}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("# Cohort-mode throughput (`experiments/benchmark_cohort.py`)\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
