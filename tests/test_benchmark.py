"""`experiments/benchmark.py`: one (model, size) cell measured in-process, its fields, the table."""

import importlib.util
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "experiments_benchmark", os.path.join(REPO, "experiments", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()


@pytest.fixture
def no_warp_xla(monkeypatch):
    """Plain-graph warps: XLA compiles one program per grid size, which dominates a tiny run."""
    from mdregnet import layers

    monkeypatch.setattr(layers, "WARP_XLA_DEFAULT", False)


def test_fit_to_grid_keeps_the_brain_and_never_upsamples():
    volume = np.zeros((40, 48, 56), np.float32)
    volume[5:35, 8:40, 6:50] = 1.0  # a 30x32x44 'brain'
    box = benchmark.brain_box([volume], margin=0)
    out, factor = benchmark.fit_to_grid(volume, (32, 32, 32), box)
    assert out.shape == (32, 32, 32) and out.dtype == np.float32
    assert factor == pytest.approx(32 / 44)  # the longest side of the box sets the zoom
    assert out.sum() == pytest.approx(volume.sum() * factor**3, rel=0.15)  # nothing cut off
    big, factor = benchmark.fit_to_grid(volume, (64, 64, 64), box)
    assert factor == 1.0 and big.sum() == volume.sum()  # padded, not zoomed


def test_measure_model_fields_and_table(no_warp_xla):
    """A 16^3 cell, one repeat: every field, JSON-serialisable, rendered as a row with the ratio.

    VoxelMorph, the smallest graph of the factory: tracing MDReg-Net's three sub-networks and
    their gradient alone takes a minute on a loaded 2-core CPU."""
    shape = (16, 16, 16)
    moving, fixed, _ = benchmark.make_pair(shape, None)
    reports = []
    cell = benchmark.measure_model("voxelmorph", shape, moving, fixed, repeats=1,
                                   report=lambda r: reports.append(dict(r)))
    assert cell["status"] == "ok", cell.get("error")
    assert set(benchmark.MODEL_FIELDS) <= set(cell)
    assert cell["shape"] == list(shape) and cell["device"] in ("cpu", "gpu")
    assert cell["outputs"] == ["disp", "warped"] and cell["finite"] is True
    for key in ("infer_first_s", "infer_median_s", "train_first_s", "train_median_s"):
        assert cell[key] > 0, key
    assert len(cell["infer_times_s"]) == 1 and len(cell["train_times_s"]) == 1
    for phase in ("infer_peak", "train_peak"):
        assert cell[phase]["rss_gib"] > 0.05  # TensorFlow alone is several hundred MiB
    assert len(cell["infer_loadavg_start"]) == 3 and np.isfinite(cell["train_loss"])
    assert reports[0]["train_median_s"] is None  # reported after inference, before training
    json.dumps(cell)

    report = {"machine": benchmark.machine_info({"tensorflow": cell["tensorflow"]}),
              "device": "cpu", "precision": "float32", "started": "now", "finished": "then",
              "loadavg_start": [0, 0, 0], "loadavg_end": [0, 0, 0], "command": "benchmark",
              "pair": "synthetic", "outputs": ["disp", "warped"], "repeats": 1,
              "sizes": [list(shape)], "peer_sizes": [list(shape)], "cells": [cell],
              "peers": [{"peer": "ants", "shape": list(shape), "status": "ok", "first_s": 4.0,
                         "median_s": 4.0, "times_s": [4.0], "rss_peak_gib": 0.3}]}
    text = benchmark.render_markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| `voxelmorph`"))
    assert f"| {benchmark._fmt(4.0 / cell['infer_median_s'], 1, 'x')} |" in row  # vs ANTs
    assert "| ANTs SyN |" in text and "Targets of issue #5" in text


def test_model_specs_and_the_targets_of_an_opt_in_variant():
    """`name:key=value` cells build the model with those hyper-parameters, and the targets list
    the paper settings first and the opt-in variant after them, each judged on its own cell."""
    assert benchmark.parse_model_spec("mdregnet") == ("mdregnet", {})
    assert benchmark.parse_model_spec("mdregnet:int_downsize=2:smoothing=none") == (
        "mdregnet", {"int_downsize": 2, "smoothing": "none"})
    with pytest.raises(ValueError, match="key=value"):
        benchmark.parse_model_spec("mdregnet:int_downsize")
    size = list(benchmark.TARGET_SIZE)
    paper = {"model": "mdregnet", "shape": size, "infer_median_s": 2.0, "train_median_s": 12.0,
             "train_peak": {"rss_gib": 9.0}}
    fast = {"model": benchmark.SPEED_VARIANTS[0], "shape": size, "infer_median_s": 1.0,
            "train_median_s": 5.0, "train_peak": {"rss_gib": 7.0}}
    report = {"cells": [paper, fast], "peer_sizes": [size],
              "peers": [{"peer": "ants", "shape": size, "status": "ok", "median_s": 45.0}]}
    rows = benchmark.targets(report)
    assert len(rows) == 2 * (3 + len(benchmark.TARGET_RATIOS))
    half = len(rows) // 2
    assert all("(opt-in)" not in target for target, _, _ in rows[:half])
    assert all("(opt-in)" in target for target, _, _ in rows[half:])
    met = {target: ok for target, _, ok in rows}
    ants = [t for t in met if "ANTs" in t]
    assert [met[t] for t in ants] == [False, True]  # 22.5x, then 45x against a 30x target
    assert [ok for t, _, ok in rows if "training step" in t] == [False, True]
    assert [ok for t, _, ok in rows if "VoxelMorph-torch" in t] == [None, None]  # not measured
