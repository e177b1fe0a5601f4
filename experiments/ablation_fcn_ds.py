"""Li & Fan's FCN ablation (their Fig. 2): the multi-resolution model with deep self-supervision,
the model without pooling layers, and the coarse-grained model, on hippocampus boxes of IXI.

    python experiments/ablation_fcn_ds.py [--data_dir work_data/ixi_2mm] \
        [--train_subjects experiments/splits/ixi_train.txt] \
        [--val_subjects experiments/splits/ixi_val.txt] [--box 16,24,24] [--steps 500] \
        [--batch_size 4] [--lr 1e-3] [--eval_pairs 100] [--out experiments/results]

What the paper did (Li & Fan 2017, `../shared/papers/fcn-deep-self-supervision.md`, Network
training, Image dataset, Results): T1 scans affinely registered to MNI space, a fixed 32x48x48
box (1 mm) around the hippocampus cut from each; three networks trained on pairs of ADNI GO/2
boxes (Adam, lr 1e-3, batch 64, 32 without pooling, 10,000 iterations): the proposed
multi-resolution FCN (two pooling layers, three regression layers, losses weighted 1, 0.6, 0.3),
the network without pooling layers (Conv1-3, one regression layer at full resolution, one loss)
and the coarse-grained model (with pooling, one regression layer at 1/4 resolution whose field is
trilinearly interpolated to full resolution). Fig. 2: normalized cross-correlation between the
fixed and registered moving images on training and testing pairs. Reported: the multi-resolution
model best, the model without pooling next, the coarse-grained model (with pooling) clearly worse;
similar values on training and testing pairs.

Here: the registry's `fcn_ds` with `pooling=True, levels=3` (multi-resolution), `pooling=False,
levels=1` (without pooling) and `pooling=True, levels=1` (coarse-grained); every other
hyper-parameter is the model's default (`mdregnet/models/fcn_ds.py` documents each reading of the
paper). Data: the prepared IXI volumes (`make prepare-ixi`: affinely aligned to the MNI152
template, 2 mm), one fixed box of `--box` voxels (default 16x24x24 = the paper's 32x48x48 mm)
centred on the mean centroid of the left hippocampus (DLMUSE label 48, `Hippocampus_L`) over the
training subjects, cut from every subject. Training: all ordered pairs of the training subjects'
boxes (`mdregnet.data.pair_dataset`), the package's train step. Evaluation (`training=False`, so
batch normalisation uses its moving statistics): `--eval_pairs` seeded random ordered pairs of
distinct training subjects and of distinct validation subjects; per pair the global NCC (Pearson
correlation over the box) between the fixed and the warped moving box, Fig. 2's measure, and on
the validation pairs also the Dice of the left hippocampus labels (moving labels warped by nearest
neighbour, the paper's overlap measure) and the folding % (det(I + grad u) <= 0).

CPU defaults: 500 steps of batch 4 per model (about 10 min in all on 2 cores). Paper's protocol:
`--steps 10000 --batch_size 64` (32 for the model without pooling: run it
separately with `--variants no_pooling --batch_size 32`), with 1 mm boxes of 32x48x48 (here the
data are 2 mm). Writes `ablation_fcn_ds.md` and `.json` into `--out`.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ablation_common as common  # noqa: E402
from mdregnet import data, infer, io, metrics, models, train  # noqa: E402

FLAGS = flags.FLAGS

#: The three models of Fig. 2 as `fcn_ds` hyper-parameters, in table order.
VARIANTS = {
    "multi_resolution": {"pooling": True, "levels": 3},
    "no_pooling": {"pooling": False, "levels": 1},
    "coarse_grained": {"pooling": True, "levels": 1},
}
TITLES = {"multi_resolution": "multi-resolution, deep self-supervision (proposed)",
          "no_pooling": "without pooling layers",
          "coarse_grained": "with pooling, coarse-grained + interpolation"}
HIPPOCAMPUS_L = 48  # DLMUSE label of the left hippocampus (../shared/data/ixi/label_names.csv)
PAPER_STEPS = 10000


def define_flags(flag_values=FLAGS):
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("data_dir", "work_data/ixi_2mm", "Prepared IXI (`make prepare-ixi`).",
                        **fv)
    flags.DEFINE_string("train_subjects", "experiments/splits/ixi_train.txt", "Training ids.",
                        **fv)
    flags.DEFINE_string("val_subjects", "experiments/splits/ixi_val.txt", "Testing ids.", **fv)
    flags.DEFINE_list("box", ["16", "24", "24"], "Box size in voxels of the prepared grid "
                      "(divisible by 4). Paper: 32x48x48 at 1 mm.", **fv)
    flags.DEFINE_integer("label", HIPPOCAMPUS_L, "Label the box is centred on and Dice is "
                         "measured for.", **fv)
    flags.DEFINE_list("variants", list(VARIANTS), "Models in table order.", **fv)
    flags.DEFINE_integer("steps", 500, f"Training steps per model (paper: {PAPER_STEPS}).",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("batch_size", 4, "Pairs per step (paper: 64; 32 without pooling).",
                         lower_bound=1, **fv)
    flags.DEFINE_float("lr", 1e-3, "Adam learning rate (paper: 1e-3).", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the weights, pair order and evaluation pairs.", **fv)
    flags.DEFINE_integer("eval_pairs", 100, "Evaluation pairs of each split (paper: 9600 "
                         "testing pairs).", lower_bound=1, **fv)
    flags.DEFINE_integer("max_train_subjects", None, "Use only the first N training subjects.",
                         **fv)
    flags.DEFINE_string("out", "experiments/results", "Folder of ablation_fcn_ds.md/.json.", **fv)
    flags.DEFINE_integer("log_every", 50, "Steps between progress lines.", **fv)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def label_centre(label_maps, label):
    """Mean over subjects (an iterable of label maps) of the centroid, in voxel coordinates, of
    `label`; ValueError if it is in none of them."""
    centres = []
    for labels in label_maps:
        where = np.argwhere(np.asarray(labels) == label)
        if len(where):
            centres.append(where.mean(axis=0))
    if not centres:
        raise ValueError(f"label {label} is in none of the label maps")
    return np.mean(centres, axis=0)


def crop_box(volume, centre, box):
    """The `box`-sized block of `volume` centred on `centre` (rounded), zero-padded if outside."""
    start = [int(round(c - b / 2.0)) for c, b in zip(centre, box)]
    pad = [(max(0, -s), max(0, s + b - n)) for s, b, n in zip(start, box, volume.shape)]
    padded = np.pad(volume, pad)
    index = tuple(slice(s + p[0], s + p[0] + b) for s, p, b in zip(start, pad, box))
    return padded[index]


def load_boxes(data_dir, train_subjects, val_subjects, box, label, max_train=None):
    """Training and validation boxes around the mean `label` centroid of the training subjects.

    Returns:
        dict with 'train_ids', 'train' `(N, *box)` float32, 'train_labels', 'val_ids', 'val',
        'val_labels' (int32) and 'centre' (voxel coordinates of the box centre).

    Raises:
        FileNotFoundError: `data_dir/images` is absent (the message says to run
            `make prepare-ixi`).
    """
    if not os.path.isdir(os.path.join(data_dir, "images")):
        raise FileNotFoundError(
            f"{data_dir}: no prepared IXI data (images/ and labels/); run `make prepare-ixi` "
            "first (it writes work_data/ixi_2mm), or pass --data_dir")
    splits = {}
    for name, subjects in (("train", train_subjects), ("val", val_subjects)):
        found = data.find_subjects(os.path.join(data_dir, "images"),
                                   os.path.join(data_dir, "labels"), subjects=subjects)
        if name == "train" and max_train:
            found = found[:max_train]
        splits[name] = found
    centre = label_centre((io.load_labels(s.labels)[0] for s in splits["train"]), label)
    out = {"centre": centre.tolist()}
    for name, found in splits.items():
        images, labels = [], []
        for start in range(0, len(found), 20):
            img, lab, _ = data.load_cohort(found[start:start + 20], with_labels=True)
            images += [crop_box(v, centre, box) for v in img]
            labels += [crop_box(v, centre, box) for v in lab]
        out[f"{name}_ids"] = [s.id for s in found]
        out[name] = np.stack(images).astype(np.float32)
        out[f"{name}_labels"] = np.stack(labels).astype(np.int32)
    return out


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
def global_ncc(a, b):
    """Pearson correlation of two arrays over all their voxels (the NCC of Fig. 2)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def evaluate_pairs(model, images, pairs, labels=None, label=None, batch=16):
    """Per-pair NCC (and with labels, Dice of `label` and folding %) after registration.

    Returns:
        dict of lists: 'ncc', 'ncc_before', and with labels 'dice', 'dice_before',
        'folding_percent'.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def call(m, f):
        out = model([m, f], training=False)
        return out["warped"], out["disp"]

    res = {"ncc": [], "ncc_before": []}
    if labels is not None:
        res.update(dice=[], dice_before=[], folding_percent=[])
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        moving = images[chunk[:, 0]][..., None]
        fixed = images[chunk[:, 1]][..., None]
        warped, disp = call(tf.constant(moving), tf.constant(fixed))
        warped, disp = np.asarray(warped)[..., 0], np.asarray(disp)
        for k, (mi, fi) in enumerate(chunk):
            res["ncc"].append(global_ncc(images[fi], warped[k]))
            res["ncc_before"].append(global_ncc(images[fi], images[mi]))
            if labels is not None:
                warped_labels = infer.warp_labels(labels[mi], disp[k])
                res["dice"].append(metrics.dice(labels[fi], warped_labels, [label])[1])
                res["dice_before"].append(metrics.dice(labels[fi], labels[mi], [label])[1])
                res["folding_percent"].append(metrics.folding(disp[k])["percent"])
    return res


def run(boxes, variants, steps, batch_size, lr, seed, eval_pairs, label=HIPPOCAMPUS_L,
        log=print, log_every=50, extra_hparams=None):
    """Trains every variant and scores it on training and validation pairs.

    `extra_hparams` (e.g. fewer features in tests) apply to every variant.

    Returns:
        dict variant -> {'hparams', 'train', 'train_pairs' (summary), 'test_pairs' (summary)}.
    """
    shape = boxes["train"].shape[1:]
    train_pairs = train.validation_pairs(len(boxes["train"]), eval_pairs, seed)
    test_pairs = train.validation_pairs(len(boxes["val"]), eval_pairs, seed)
    results = {}
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; one of {list(VARIANTS)}")
        batches = data.pair_dataset(boxes["train"], batch_size=batch_size,
                                    seed=seed).as_numpy_iterator()
        hparams = dict(extra_hparams or {}, **VARIANTS[name])
        model, info = common.train_variant("fcn_ds", shape, hparams, batches, steps,
                                           lr=lr, seed=seed, log=log, log_every=log_every,
                                           label=name)
        on_train = evaluate_pairs(model, boxes["train"], train_pairs)
        on_test = evaluate_pairs(model, boxes["val"], test_pairs, boxes["val_labels"], label)
        results[name] = {
            "hparams": model.mdregnet_config["hparams"], "train": info,
            "train_pairs": {k: common.stat(v) for k, v in on_train.items()},
            "test_pairs": {k: common.stat(v) for k, v in on_test.items()},
            "n_train_pairs": int(len(train_pairs)), "n_test_pairs": int(len(test_pairs))}
        log(f"{name}: NCC train {results[name]['train_pairs']['ncc']['mean']:.4f}, test "
            f"{results[name]['test_pairs']['ncc']['mean']:.4f}, hippocampus Dice "
            f"{results[name]['test_pairs']['dice']['mean']:.4f}")
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def table(results):
    rows = []
    for name, r in results.items():
        hp = r["hparams"]
        rows.append([TITLES.get(name, name), str(hp["pooling"]), str(hp["levels"]),
                     common.fmt_stat(r["train_pairs"]["ncc"]),
                     common.fmt_stat(r["test_pairs"]["ncc"]),
                     common.fmt_stat(r["test_pairs"]["dice"], 3),
                     common.fmt(r["test_pairs"]["folding_percent"]["mean"], 3),
                     f"{r['train']['parameters']:,}"])
    return common.markdown_table(
        ["model", "pooling", "levels (loss layers)", "NCC, training pairs",
         "NCC, testing pairs", "hippocampus Dice, testing pairs", "folding %, testing",
         "parameters"], rows)


def markdown(results, settings):
    s = settings
    first = next(iter(results.values()))
    lines = [
        "# Li & Fan FCN ablation (Fig. 2): multi-resolution vs without pooling vs coarse-grained",
        "",
        f"Hippocampus boxes of {'x'.join(map(str, s['box']))} voxels at {s['voxel_mm']:g} mm "
        f"(the paper: 32x48x48 at 1 mm) cut at one fixed position (the mean centroid of label "
        f"{s['label']}, left hippocampus, over the training subjects: voxel "
        f"{[round(c, 1) for c in s['centre']]}) from the prepared IXI volumes (affinely aligned "
        f"to MNI152). {s['n_train']} training subjects (all ordered pairs), {s['n_val']} testing "
        f"subjects. Each model: `fcn_ds` with its defaults but pooling/levels, {s['steps']} "
        f"steps, batch {s['batch_size']}, Adam lr {s['lr']:g}, seed {s['seed']}. Scores on "
        f"{first['n_train_pairs']} training and {first['n_test_pairs']} testing pairs (seeded, "
        "distinct subjects), mean ± std over pairs; NCC = Pearson correlation over the box "
        "between the fixed and the warped moving image.",
        "",
        common.cpu_budget_sentence(s["steps"], f"{PAPER_STEPS:,} iterations of batch 64 (32 "
                                               "without pooling) on a GPU"),
        "",
        "Paper (Fig. 2): the multi-resolution model is best and the model without pooling "
        "next; the coarse-grained model is clearly worse; training and testing NCC are similar.",
        "",
        table(results),
        "",
        f"Before registration: NCC {common.fmt_stat(first['train_pairs']['ncc_before'])} "
        f"(training pairs), {common.fmt_stat(first['test_pairs']['ncc_before'])} (testing "
        f"pairs); hippocampus Dice {common.fmt_stat(first['test_pairs']['dice_before'], 3)}.",
        "",
        "## Run",
        "",
        f"- machine: {s['machine']}",
        "- training time per model: " + ", ".join(
            f"{n} {r['train']['seconds']:.0f} s "
            f"({common.fmt(r['train']['seconds_per_step'], 3)} s/step)"
            for n, r in results.items()),
        f"- total wall time: {s['wall_seconds'] / 60:.1f} min, finished {s['finished']}",
        f"- command: `{s['command']}`",
        "- paper's budget: `--steps 10000 --batch_size 64` (and `--variants no_pooling "
        "--batch_size 32`), on a GPU",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def run_from_flags(fv=FLAGS, argv=None, log=print):
    """The script's work from parsed flags; returns `(results, settings, paths)`."""
    started = time.perf_counter()
    box = common.parse_ints(fv.box, "box")
    if len(box) != 3:
        raise ValueError(f"--box needs 3 sizes, got {fv.box}")
    train.check_shape(box, "fcn_ds", models.get_method("fcn_ds").divisor, "--box")
    variants = [v.strip() for v in fv.variants if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; one of {list(VARIANTS)}")
    data_dir = common.resolve(fv.data_dir)
    machine = common.machine()
    boxes = load_boxes(data_dir, common.resolve(fv.train_subjects),
                       common.resolve(fv.val_subjects), box, fv.label, fv.max_train_subjects)
    log(f"{len(boxes['train'])} training and {len(boxes['val'])} testing boxes of {box} around "
        f"voxel {np.round(boxes['centre'], 1).tolist()}, loaded in "
        f"{time.perf_counter() - started:.0f} s")
    results = run(boxes, variants, fv.steps, fv.batch_size, fv.lr, fv.seed, fv.eval_pairs,
                  fv.label, log=log, log_every=fv.log_every)
    import nibabel as nib

    first = sorted(os.listdir(os.path.join(data_dir, "images")))[0]
    voxel = float(nib.load(os.path.join(data_dir, "images", first)).header.get_zooms()[0])
    settings = {"data_dir": os.path.abspath(data_dir), "box": list(box), "voxel_mm": voxel,
                "label": fv.label, "centre": boxes["centre"], "n_train": len(boxes["train"]),
                "n_val": len(boxes["val"]), "variants": variants, "steps": fv.steps,
                "batch_size": fv.batch_size, "lr": fv.lr, "seed": fv.seed,
                "eval_pairs": fv.eval_pairs, "paper_steps": PAPER_STEPS, "machine": machine,
                "wall_seconds": time.perf_counter() - started, "finished": common.timestamp(),
                "command": common.command_line(argv)}
    text = markdown(results, settings)
    paths = common.write_report(common.resolve(fv.out), "fcn_ds", text,
                                {"settings": settings, "results": results,
                                 "train_ids": boxes["train_ids"], "val_ids": boxes["val_ids"]})
    print(text)
    log(f"wrote {paths[0]} and {paths[1]}")
    return results, settings, paths


main = common.absl_main("ablation_fcn_ds", run_from_flags, FLAGS)

if __name__ == "__main__":
    define_flags()
    app.run(main)
