"""Shared fixtures: real brain MRI from ../shared/data, cropped or down-sampled for CPU tests."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("MDREGNET_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))


def shared_path(*parts):
    """Path inside ../shared/data; skips the test with a clear message when it is absent."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (set MDREGNET_SHARED_DATA to ../shared/data)")
    return path


def _load(path, dtype):
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj).astype(dtype)


@pytest.fixture(scope="session")
def oasis_slices():
    """Two real OASIS 2D slices, 160x192: (moving, fixed, moving_seg, fixed_seg), seg24 labels."""
    out = []
    for kind, dtype in (("norm", np.float32), ("seg24", np.int32)):
        for subject in ("001", "002"):
            out.append(_load(shared_path("slices2d", "oasis", f"{subject}slice",
                                         f"slice_{kind}.nii.gz"), dtype)[..., 0])
    moving, fixed, moving_seg, fixed_seg = out
    return moving, fixed, moving_seg, fixed_seg


@pytest.fixture(scope="session")
def oasis_pair_3d():
    """Two real OASIS volumes down-sampled x4 (block mean; labels by the block's centre voxel)
    and cropped to 32x48x48: (moving, fixed, moving_seg35, fixed_seg35)."""
    out = []
    for kind in ("norm", "seg35"):
        for suffix in ("", "_2"):
            vol = _load(shared_path("oasis", f"aligned_{kind}{suffix}.nii.gz"),
                        np.float32 if kind == "norm" else np.int32)
            if kind == "norm":
                vol = vol.reshape(40, 4, 48, 4, 56, 4).mean(axis=(1, 3, 5))
            else:
                vol = vol[2::4, 2::4, 2::4]
            out.append(vol[4:36, :, 4:52])
    return tuple(out)


def _fit_pair(model, moving, fixed, steps, lr):
    """Trains `model` on one pair with its own objective and Adam; returns the loss per step."""
    import tensorflow as tf

    from mdregnet import models

    loss_fn = models.objective(model)
    opt = tf.keras.optimizers.Adam(lr)

    @tf.function
    def step(m, f):
        with tf.GradientTape() as tape:
            total, _ = loss_fn(m, f, model([m, f], training=True))
        opt.apply_gradients(zip(tape.gradient(total, model.trainable_weights),
                                model.trainable_weights))
        return total

    return [float(step(moving, fixed)) for _ in range(steps)]


@pytest.fixture(scope="session")
def fit_pair():
    """The short single-pair training loop shared by the models' real-data tests."""
    return _fit_pair
