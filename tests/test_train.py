"""Tests of mdregnet.train: a tiny run end to end, resumption, signals, strategies, bad inputs.

Data: smooth random 32^3 volumes (one Gaussian-filtered noise pattern translated by up to 3 voxels
per subject, scaled to [0, 1]) with 4-class label maps from its intensity, written as NIfTI on one
identity grid. Models are shrunk (fewer filters) so a step takes ~0.1 s on 2 CPU cores; the cost
of each run is mostly the tracing of the train step (~5 s for voxelmorph, ~12 s for mdregnet).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mdregnet import train

TINY = {
    "voxelmorph": {"enc_features": [8, 16, 16, 16], "dec_features": [16, 16, 16, 16, 16, 8, 8]},
    "mdregnet": {"enc_features": [8, 16, 16, 16], "dec_features": 16, "head_features": [16, 8]},
    "patch_fcn": {"features": [4, 8, 8, 8, 8], "stages": 1, "alphas": [0.01]},
    "vjl_sn": {"sn_features": [4, 8, 8, 4], "lam": 1.0},
    "vjl_lunet": {"lunet_features": [4, 8, 8, 8], "lam": 1.0},
}
#: The keys of each objective's `terms` dict (all logged to TensorBoard).
TERMS = {"voxelmorph": ["sim", "grad"],
         "mdregnet": ["sim", "grad"] + [f"{term}_level{level}" for term in ("sim", "grad")
                                        for level in (1, 2, 3)]}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_cohort(root, n, shape, seed=0):
    import nibabel as nib
    from scipy import ndimage

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    rng = np.random.default_rng(seed)
    margin = 8
    base = ndimage.gaussian_filter(rng.standard_normal([s + 2 * margin for s in shape]), 2.0)
    crop = tuple(slice(margin, margin + s) for s in shape)
    for i in range(n):
        vol = ndimage.shift(base, rng.uniform(-3, 3, 3), order=1, mode="nearest")[crop]
        vol = ((vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)
        labels = np.digitize(vol, [0.4, 0.5, 0.6]).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), os.path.join(root, "images", f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)),
                 os.path.join(root, "labels", f"s{i}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_cohort(str(tmp_path_factory.mktemp("cohort")), 4, (32, 32, 32))


def _config(data_dir, workdir, model="voxelmorph", **overrides):
    config = dict(model=model, hparams=dict(TINY[model]), data_dir=data_dir, workdir=str(workdir),
                  steps=6, batch_size=1, lr=1e-3, seed=0, deterministic=True, log_every=1,
                  checkpoint_every=100, val_every=100, val_pairs=4, val_subjects=None)
    config.update(overrides)
    return config


def _events(folder):
    """`{tag: [(step, value or None)]}` of the TensorBoard event files in `folder`."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out = {}
    files = [os.path.join(folder, f) for f in os.listdir(folder) if "tfevents" in f]
    for record in tf.data.TFRecordDataset(files):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
            tensor = tf.make_ndarray(value.tensor)
            number = float(tensor) if tensor.dtype.kind == "f" else None
            out.setdefault(value.tag, []).append((event.step, number))
    return out


def _checkpoint_state(path):
    """Every tensor of a checkpoint (weights, Adam's moments and iterations, step) by key, but the
    bookkeeping that legitimately differs (object graph, number of saves)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    names = sorted(n for n in reader.get_variable_to_shape_map()
                   if not n.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter")))
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow
def test_tiny_run_learns_and_writes_everything(data_dir, tmp_path):
    """MDReg-Net end to end (the other tests use the cheaper voxelmorph: the loop is the same)."""
    from mdregnet import models

    model = "mdregnet"
    workdir = tmp_path / "run"
    summary = train.train(_config(data_dir, workdir, model=model, steps=30, checkpoint_every=10,
                                  val_every=15, val_subjects=["s2", "s3"], log_every=5))
    assert summary["step"] == 30 and not summary["interrupted"]
    assert summary["resumed_from"] is None

    # Validation on fixed pairs at steps 0, 15 and 30: the objective went down. With op
    # determinism the numbers are reproducible; the decrease measured after 30 steps is about
    # 5e-3 (4e-3 with voxelmorph), so a 1e-3 margin fails only if learning is broken.
    history = summary["val_history"]
    assert [step for step, _ in history] == [0, 15, 30]
    assert history[-1][1]["loss"] < history[0][1]["loss"] - 1e-3
    val = summary["validation"]
    assert val["pairs"] == 2 and 0.0 <= val["dice_mean"] <= 1.0 and 0.0 <= val["dice_before"] <= 1.0
    assert val["folding_percent"] >= 0.0
    assert all(np.isfinite(loss) for _, loss in summary["loss_history"])

    # Checkpoints every 10 steps, the last 3 kept; the run config next to them.
    ckpt = workdir / "ckpt"
    assert sorted(p.name for p in ckpt.glob("ckpt-*.index")) == [
        "ckpt-10.index", "ckpt-20.index", "ckpt-30.index"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["format"] == train.CONFIG_FORMAT
    assert config["model"]["name"] == model
    assert config["model"]["hparams"] == models.registry.resolve_hparams(model, **TINY[model])
    assert config["train"]["steps"] == 30 and config["train"]["lr"] == 1e-3
    assert config["data"]["train_ids"] == ["s0", "s1", "s2", "s3"]

    # TensorBoard: every term of the objective, the learning rate, validation numbers, slices.
    scalars = _events(workdir / "logs" / "train")
    for tag in ["loss", "learning_rate", "steps_per_second"] + [f"loss/{k}" for k in TERMS[model]]:
        assert tag in scalars, tag
    assert [step for step, _ in scalars["loss"]] == [5, 10, 15, 20, 25, 30]
    assert scalars["learning_rate"][0][1] == pytest.approx(1e-3)
    validation = _events(workdir / "logs" / "validation")
    for tag in ("loss", "dice_mean", "dice_before", "folding_percent", "slice/fixed",
                "slice/moving", "slice/warped"):
        assert tag in validation, tag
    assert validation["dice_mean"][-1] == (30, pytest.approx(val["dice_mean"], rel=1e-6))

    # The final model: models.load rebuilds it, with the last checkpoint's weights.
    loaded = models.load(str(workdir / "model"))
    assert loaded.mdregnet_config["name"] == model
    assert loaded.mdregnet_config["extra"]["validation"]["dice_mean"] == pytest.approx(
        val["dice_mean"])
    restored = models.build(model, (32, 32, 32), **TINY[model])
    import tensorflow as tf

    tf.train.Checkpoint(model=restored).restore(str(ckpt / "ckpt-30")).expect_partial()
    for a, b in zip(loaded.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted(data_dir, tmp_path):
    full = train.train(_config(data_dir, tmp_path / "a", steps=6))
    first = train.train(_config(data_dir, tmp_path / "b", steps=3))
    assert first["step"] == 3 and first["resumed_from"] is None
    resumed = train.train(_config(data_dir, tmp_path / "b", steps=6))
    assert resumed["resumed_from"] == 3 and resumed["step"] == 6
    # Steps 4-6 of both runs saw the same pairs: the losses logged per step agree.
    np.testing.assert_allclose([l for _, l in resumed["loss_history"]],
                               [l for s, l in full["loss_history"] if s > 3], rtol=1e-6)

    from mdregnet import models

    a = models.load(str(tmp_path / "a" / "model")).get_weights()
    b = models.load(str(tmp_path / "b" / "model")).get_weights()
    assert len(a) == len(b) > 10
    # Op determinism: the same ops on the same data in the same order, so equal up to float
    # round-off (in practice bit for bit).
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(wa, wb, rtol=1e-6, atol=1e-9)
    # ... and so is the optimizer's state (moments, iterations) and the step counter.
    state_a = _checkpoint_state(str(tmp_path / "a" / "ckpt" / "ckpt-6"))
    state_b = _checkpoint_state(str(tmp_path / "b" / "ckpt" / "ckpt-6"))
    state_mid = _checkpoint_state(str(tmp_path / "b" / "ckpt" / "ckpt-3"))
    assert state_a.keys() == state_b.keys()
    assert any(key.startswith("optimizer/_variables/") for key in state_a)  # Adam's moments
    for key in state_a:
        np.testing.assert_allclose(state_a[key], state_b[key], rtol=1e-6, atol=1e-9,
                                   err_msg=key)
    assert state_a["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"] == 6
    assert state_a["step/.ATTRIBUTES/VARIABLE_VALUE"] == 6
    assert state_mid["step/.ATTRIBUTES/VARIABLE_VALUE"] == 3
    # Steps 4-6 changed the weights (the comparison above is not between untouched models).
    assert any(not np.allclose(state_a[k], state_mid[k], rtol=0, atol=1e-7) for k in state_a
               if k.startswith("optimizer/_trainable_variables/"))

    # Done already: a rerun trains nothing and keeps the step.
    again = train.train(_config(data_dir, tmp_path / "b", steps=6))
    assert again["step"] == 6 and again["loss_history"] == []

    # Resuming with other hyper-parameters (here lam) is refused before anything is written.
    with pytest.raises(train.ConfigError,
                       match=r"other hyper-parameters.*lam: saved 1\.0, now 0\.5"):
        train.train(_config(data_dir, tmp_path / "b", steps=8, lam=0.5))
    with pytest.raises(train.ConfigError, match="trained with model 'voxelmorph'"):
        train.train(_config(data_dir, tmp_path / "b", model="mdregnet", steps=8))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_returns(data_dir, tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    def send_sigterm(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train.train(_config(data_dir, tmp_path, steps=50, checkpoint_every=100),
                          step_callback=send_sigterm)
    assert summary["interrupted"] and summary["signal"] == "SIGTERM"
    assert summary["step"] == 2
    assert summary["checkpoint"].endswith("ckpt-2")
    assert (tmp_path / "ckpt" / "ckpt-2.index").exists()
    assert not (tmp_path / "model").exists()  # the final model only after the last step
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    import tensorflow as tf

    reader = tf.train.load_checkpoint(summary["checkpoint"])
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 2


@pytest.mark.slow
def test_mixed_precision_trains_with_loss_scaling(data_dir, tmp_path):
    """'mixed_float16' (slow on a CPU, which emulates float16: 1 step) with a LossScaleOptimizer;
    the global policy is restored afterwards, and the saved model is a float32 model."""
    import keras

    from mdregnet import models

    summary = train.train(_config(data_dir, tmp_path, steps=1, mixed_precision="on"))
    assert summary["mixed_precision"] and summary["step"] == 1
    assert all(np.isfinite(loss) for _, loss in summary["loss_history"])
    scalars = _events(tmp_path / "logs" / "train")
    assert scalars["loss_scale"][-1][1] > 1.0  # dynamic loss scale, 32768 at the start
    assert keras.mixed_precision.global_policy().name == "float32"
    assert models.load(str(tmp_path / "model")).dtype_policy.name == "float32"


@pytest.mark.slow
def test_bfloat16_trains_without_loss_scaling(data_dir, tmp_path):
    """'bf16' (emulated on a CPU without AVX512-BF16: 2 steps): no loss scaling; the policy is
    recorded in the history and restored afterwards, and the saved model is float32."""
    import keras

    from mdregnet import models

    summary = train.train(_config(data_dir, tmp_path, steps=2, mixed_precision="bf16"))
    assert summary["precision"] == "mixed_bfloat16" and summary["step"] == 2
    assert all(np.isfinite(loss) for _, loss in summary["loss_history"])
    assert "loss_scale" not in _events(tmp_path / "logs" / "train")
    history = models.read_config(str(tmp_path / "model"))["extra"]["history"]
    assert {row[3] for row in history["train"]} == {"mixed_bfloat16"}
    assert history["runs"][-1]["precision"] == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert models.load(str(tmp_path / "model")).dtype_policy.name == "float32"


@pytest.mark.parametrize("model", ["voxelmorph", "mdregnet"])
def test_bfloat16_policy_keeps_fields_in_float32(model):
    """Under 'mixed_bfloat16' the convolutions compute in bfloat16, the flow heads and all that
    follows them (integration, warps, resizing, smoothing) in float32: every output is float32."""
    import keras

    from mdregnet import models

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        net = models.build(model, (32, 32, 32), **TINY[model])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv3D)]
    heads = [layer for layer in convs if layer.filters == 3]  # the flow heads (3 channels)
    assert len(heads) == {"voxelmorph": 1, "mdregnet": 3}[model]
    assert all(layer.compute_dtype == "float32" for layer in heads)
    assert all(layer.compute_dtype == "bfloat16" for layer in convs if layer not in heads)
    x = np.random.default_rng(0).random((1, 32, 32, 32, 1)).astype(np.float32)
    outputs = net([x, x])
    assert {str(v.dtype) for v in outputs.values()} == {"<dtype: 'float32'>"}, \
        {k: str(v.dtype) for k, v in outputs.items()}


def test_precision_modes():
    import tensorflow as tf

    assert train.resolve_precision("off") == "float32"
    assert train.resolve_precision("fp16") == train.resolve_precision("on") == "mixed_float16"
    assert train.resolve_precision("bf16") == "mixed_bfloat16"
    auto = ("mixed_float16" if tf.config.list_physical_devices("GPU") else
            "mixed_bfloat16" if train.cpu_has_bf16() else "float32")
    assert train.resolve_precision("auto") == auto
    with pytest.raises(train.ConfigError, match="mixed_precision must be one of"):
        train.resolve_precision("int8")


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mdregnet import train
    config = json.loads(sys.argv[1])
    kinds = {name: type(train.get_strategy(name)).__name__
             for name in ("default", "one_device", "mirrored")}
    out = {"kinds": kinds, "replicas": train.get_strategy("mirrored").num_replicas_in_sync}
    for name in ("default", "mirrored"):
        summary = train.train(dict(config, strategy=name, workdir=config["workdir"] + name))
        out[name] = {"losses": [l for _, l in summary["loss_history"]],
                     "replicas": summary["replicas"], "checkpoint": summary["checkpoint"]}
    # Adam's first and second moments after the last step, per variable: proportional to the
    # gradients (and their squares), so they see a wrong per-replica scaling that Adam's
    # normalised update hides from the losses.
    readers = {name: tf.train.load_checkpoint(out[name]["checkpoint"])
               for name in ("default", "mirrored")}
    keys = [k for k in readers["default"].get_variable_to_shape_map()
            if k.startswith("optimizer/_variables/")]
    out["moments_max_rel_diff"] = max(
        float(np.abs(readers["default"].get_tensor(k) - readers["mirrored"].get_tensor(k)).max()
              / max(np.abs(readers["default"].get_tensor(k)).max(), 1e-30)) for k in keys)
    out["moments"] = len(keys)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_on_two_cpus_matches_default(data_dir, tmp_path):
    """MirroredStrategy over 2 logical CPUs, global batch 2 (1 per replica), against the default
    strategy with batch 2: the same losses. Own process: logical devices must be set before
    TensorFlow initialises."""
    config = _config(data_dir, str(tmp_path / "run_"), steps=3, batch_size=2)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT, json.dumps(config)],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["kinds"] == {"default": "_DefaultDistributionStrategy",
                            "one_device": "OneDeviceStrategy", "mirrored": "MirroredStrategy"}
    assert out["replicas"] == 2 and out["mirrored"]["replicas"] == 2
    assert out["default"]["replicas"] == 1
    # The same weights and data at every step: equal up to the order of float32 sums.
    np.testing.assert_allclose(out["mirrored"]["losses"], out["default"]["losses"], rtol=1e-5)
    # The gradients: each replica's loss / 2, summed over the replicas, is the gradient of the
    # global batch mean (without the division the first moments would be 2x, the second 4x).
    assert out["moments"] > 10
    assert out["moments_max_rel_diff"] < 1e-3, out["moments_max_rel_diff"]


# ------------------------------------------------------------------------------------------------
# Bad inputs and small pieces (fast: they fail before any model is built)
# ------------------------------------------------------------------------------------------------
def test_unknown_model_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(train.ConfigError,
                       match=r"unknown model 'nosuchnet'; available: .*mdregnet"):
        train.train(_config(data_dir, tmp_path, model="voxelmorph") | {"model": "nosuchnet"})
    with pytest.raises(train.ConfigError, match="unknown hyper-parameter"):
        train.train(_config(data_dir, tmp_path, hparams={"no_such_hp": 1}))
    with pytest.raises(train.ConfigError, match="unknown setting"):
        train.train(dict(_config(data_dir, tmp_path), stpes=3))


def test_shape_not_divisible_is_a_clear_error(tmp_path):
    bad = _write_cohort(str(tmp_path / "bad"), 2, (24, 32, 40))
    config = _config(bad, tmp_path / "run")
    with pytest.raises(train.ConfigError,
                       match=r"24x32x40 cannot be used by model 'voxelmorph'.*divisible by 16 "
                             r"\(axis 0: 24 -> 16 or 32; axis 2: 40 -> 32 or 48\).*"
                             r"--input_shape 32,32,48"):
        train.train(config)
    with pytest.raises(train.ConfigError, match=r"--input_shape: shape 30x32x32 .*axis 0: 30"):
        train.train(dict(config, input_shape=(30, 32, 32)))
    assert not (tmp_path / "run").exists()


def test_fit_to_shape_centre_crops_and_pads():
    volumes = np.arange(2 * 5 * 4 * 3).reshape(2, 5, 4, 3)
    out, note = train.fit_to_shape(volumes, (3, 4, 6))
    assert out.shape == (2, 3, 4, 6) and out.dtype == volumes.dtype
    np.testing.assert_array_equal(out[:, :, :, 1:4], volumes[:, 1:4])  # crop 1 each side
    assert not out[:, :, :, [0, 4, 5]].any()  # pad 1 before, 2 after
    assert note == "axis 0 cropped 5->3, axis 2 padded 3->6"
    assert train.fit_to_shape(volumes, (5, 4, 3))[1] == ""


def test_flags_parse_into_config():
    from absl import flags

    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["prog", "--model", "voxelmorph", "--hparams", '{"int_steps": 5}', "--lam", "0.5",
        "--data_dir", "d", "--input_shape", "32,48,32", "--steps", "10", "--batch_size", "2",
        "--strategy", "mirrored", "--mixed_precision", "off", "--workdir", "w"])
    config = train.config_from_flags(fv)
    assert config == train.TrainConfig(
        model="voxelmorph", hparams={"int_steps": 5}, lam=0.5, data_dir="d",
        input_shape=(32, 48, 32), steps=10, batch_size=2, strategy="mirrored",
        mixed_precision="off", workdir="w")
    assert config.lr == 1e-4 and config.log_dir is None  # the paper's learning rate
    fv(["prog", "--hparams", "[1, 2]"])
    with pytest.raises(train.ConfigError, match="JSON object"):
        train.config_from_flags(fv)


def test_cli_reports_errors_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "mdregnet.train", "--model", "nosuchnet",
                           "--data_dir", str(tmp_path), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "mdregnet.train: error: unknown model 'nosuchnet'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_patch_training_of_patch_fcn(data_dir, tmp_path):
    """`patch_size`: the model is built for patches, trained on patch batches drawn from the
    pairs, and validated on whole volumes by patch inference; other models refuse it."""
    from mdregnet import models

    summary = train.train(_config(data_dir, tmp_path, model="patch_fcn", steps=3, batch_size=4,
                                  patch_size=16, val_every=3, val_subjects=["s2", "s3"],
                                  val_pairs=2))
    assert summary["step"] == 3 and summary["input_shape"] == [32, 32, 32]
    assert all(np.isfinite(loss) for _, loss in summary["loss_history"])
    validation = summary["validation"]
    assert validation["pairs"] == 2 and np.isfinite(validation["loss"])
    assert 0.0 < validation["dice_mean"] <= 1.0 and validation["folding_count"] == 0
    assert models.read_config(str(tmp_path / "model"))["input_shape"] == [16, 16, 16]
    with pytest.raises(train.ConfigError, match="patch training is implemented for"):
        train.train(_config(data_dir, tmp_path / "other", patch_size=16))


@pytest.mark.slow
def test_checkpoints_older_than_a_new_hyper_parameter_still_resume(data_dir, tmp_path):
    """A run saved before a hyper-parameter existed (here voxelmorph's `similarity`) resumes:
    the missing key takes its default, which is the old behaviour."""
    train.train(_config(data_dir, tmp_path, steps=1))
    path = tmp_path / "ckpt" / train.CONFIG_FILE
    saved = json.loads(path.read_text())
    del saved["model"]["hparams"]["similarity"]
    path.write_text(json.dumps(saved))
    summary = train.train(_config(data_dir, tmp_path, steps=2))
    assert summary["resumed_from"] == 1 and summary["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vjl_sn", "vjl_lunet", "patch_fcn"])
def test_every_seed_method_trains_through_the_training_command(data_dir, tmp_path, model):
    """The methods added after the first ones (3D here) train with `mdregnet.train` itself, their
    own objective, validation with Dice, and a saved model that `models.load` reads back."""
    from mdregnet import models

    summary = train.train(_config(data_dir, tmp_path, model=model, steps=3, val_every=3,
                                  val_subjects=["s2", "s3"], val_pairs=2))
    assert summary["step"] == 3 and all(np.isfinite(l) for _, l in summary["loss_history"])
    assert 0.0 < summary["validation"]["dice_mean"] <= 1.0
    assert models.load(str(tmp_path / "model")).mdregnet_config["name"] == model


def _weights_of(path):
    from mdregnet import models

    return models.load(str(path)).get_weights()


@pytest.mark.slow
def test_warm_start_continues_steps_history_and_weights(data_dir, tmp_path):
    """`init_from`: the new run starts from the saved weights (a run at a negligible learning
    rate ends where it started, a cold one elsewhere), changes of hyper-parameters that keep the
    weight shapes are recorded, and the saved model carries the cumulative step count and the
    whole history, also across an interruption of the warm-started run."""
    from mdregnet import models

    val = dict(val_subjects=["s2", "s3"], val_pairs=2, log_every=2)
    first = tmp_path / "first"
    train.train(_config(data_dir, first, steps=4, val_every=100, **val))
    start = _weights_of(first / "model")

    # Adam moves every weight by about lr per step: at lr 1e-9 three steps stay within 1e-8.
    still = tmp_path / "still"
    train.train(_config(data_dir, still, steps=3, lr=1e-9, init_from=str(first / "model"), **val))
    for a, b in zip(start, _weights_of(still / "model")):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-8)
    cold = tmp_path / "cold"
    train.train(_config(data_dir, cold, steps=3, lr=1e-9, seed=1, **val))
    assert max(float(np.abs(a - b).max()) for a, b in zip(start, _weights_of(cold / "model"))) \
        > 1e-3

    # A continuation with another lam, interrupted after 3 of its 5 steps and resumed.
    second = tmp_path / "second"
    config = _config(data_dir, second, steps=3, val_every=100, lam=0.5,
                     init_from=str(first / "model"), **val)
    summary = train.train(config)
    assert summary["resumed_from"] is None and summary["validation"]["step"] == 7
    summary = train.train(dict(config, steps=5))
    assert summary["resumed_from"] == 3 and summary["step"] == 5
    extra = models.read_config(str(second / "model"))["extra"]
    assert extra["cumulative_steps"] == extra["step"] == 9 and extra["run_steps"] == 5
    history = extra["history"]
    assert history["train_columns"] == list(train.TRAIN_COLUMNS)
    assert [row[0] for row in history["train"]] == [2, 4, 6, 7, 8, 9]  # kept across the resume
    assert all(row[2] == pytest.approx(1e-3) and row[3] == "float32" for row in history["train"])
    assert [v["step"] for v in history["validation"]] == [0, 4, 7, 9]
    assert all(0.0 <= v["dice_mean"] <= 1.0 for v in history["validation"])
    runs = history["runs"]
    assert [(r["start_step"], r["end_step"]) for r in runs] == [(0, 4), (4, 9)]
    assert runs[0]["init_from"] is None and runs[0]["hparams"]["lam"] == 1.0
    assert runs[1]["init_from"] == os.path.abspath(first / "model")
    assert runs[1]["changed_hparams"] == {"lam": [1.0, 0.5]} and runs[1]["completed"]
    assert runs[1]["hparams"]["lam"] == 0.5 and runs[1]["precision"] == "float32"
    # TensorBoard continues the model's step count.
    # (two event files, one per process, read in directory order: compare sorted)
    assert sorted(s for s, _ in _events(second / "logs" / "train")["loss"]) == [6, 7, 8, 9]

    # experiments/training_curve.py draws it and tabulates every validation.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "training_curve", os.path.join(REPO, "experiments", "training_curve.py"))
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    histories = [curve.load_history(str(second / "model")), curve.load_history(str(first / "model"))]
    assert [label for label, _ in histories] == ["voxelmorph (9 steps)", "voxelmorph (4 steps)"]
    curve.plot(histories, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = curve.table(histories).splitlines()[2:]
    assert len(rows) == 4 + 2 and rows[3].startswith("| voxelmorph (9 steps) | 9 | ")


def test_warm_start_refuses_another_model_or_architecture(data_dir, tmp_path):
    train.train(_config(data_dir, tmp_path / "vm", steps=1))
    source = str(tmp_path / "vm" / "model")
    with pytest.raises(train.ConfigError, match=r"--init_from .*a 'voxelmorph' model; this run "
                                                r"trains 'mdregnet'"):
        train.train(_config(data_dir, tmp_path / "a", model="mdregnet", init_from=source))
    wider = {"enc_features": [8, 16, 16, 32]}
    with pytest.raises(train.ConfigError, match=r"weights of another architecture.*"
                                                r"enc_features: saved \[8, 16, 16, 16\], now "
                                                r"\[8, 16, 16, 32\]"):
        train.train(_config(data_dir, tmp_path / "b", hparams=dict(TINY["voxelmorph"], **wider),
                            init_from=source))
    with pytest.raises(train.ConfigError, match=r"--init_from: .*nowhere: no such model"):
        train.train(_config(data_dir, tmp_path / "c", init_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "a" / "ckpt").exists() and not (tmp_path / "c" / "ckpt").exists()


@pytest.mark.slow
def test_warm_start_from_the_shipped_model_records_its_earlier_training(data_dir, tmp_path):
    """The shipped MDReg-Net continued with the other integration grid (a computation-only
    change): its steps are counted on and its history (or, for a model saved before histories
    existed, its last numbers) kept."""
    from mdregnet import models

    shipped = os.path.join(REPO, "mdregnet", "pretrained", "mdregnet_ixi2mm")
    config = models.read_config(shipped)
    before = config["extra"]
    shipped_downsize = config["hparams"].get("int_downsize", 1)
    other = 1 if shipped_downsize == 2 else 2  # a computation-only change, whichever is shipped
    summary = train.train(dict(model="mdregnet", hparams={"int_downsize": other}, data_dir=data_dir,
                               workdir=str(tmp_path), steps=1, log_every=1, val_subjects=None,
                               init_from=shipped))
    assert summary["step"] == 1
    extra = models.read_config(str(tmp_path / "model"))["extra"]
    assert extra["cumulative_steps"] == before.get("cumulative_steps", before["step"]) + 1
    runs = extra["history"]["runs"]
    assert runs[-1]["changed_hparams"] == {"int_downsize": [shipped_downsize, other]}
    assert runs[-1]["start_step"] == extra["cumulative_steps"] - 1
    assert runs[0]["start_step"] == 0 and runs[0]["lr"] == pytest.approx(1e-4)
