"""Fault tolerance and scale-out of `python -m mdregnet.train`, as real processes.

- kill -9 of a training process, then the same command again: it resumes from the last
  checkpoint at its step, and ends with the weights of an uninterrupted run;
- two workers of a `MultiWorkerMirroredStrategy` cluster on 127.0.0.1 (CPU): the same losses and
  weights as one process with the same global batch; one worker killed: the other stops within
  seconds with exit status 75 and a one-line message; restarting both resumes from the chief's
  last checkpoint;
- a run directory that cannot be written, and a disk that fills up while a checkpoint is saved:
  a one-line error, nothing half-written left.

Same tiny cohort and model as tests/test_train.py (32^3 volumes, shrunk VoxelMorph).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mdregnet import train

from test_train import REPO, TINY, _checkpoint_state, _config, _write_cohort

HPARAMS = json.dumps(TINY["voxelmorph"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_cohort(str(tmp_path_factory.mktemp("cohort")), 4, (32, 32, 32))


def _command(data_dir, workdir, steps, batch_size=1, checkpoint_every=3, strategy="default"):
    return [sys.executable, "-m", "mdregnet.train", "--model", "voxelmorph", "--hparams", HPARAMS,
            "--data_dir", data_dir, "--workdir", str(workdir), f"--steps={steps}",
            f"--batch_size={batch_size}", "--lr=1e-3", "--seed=0", "--deterministic",
            "--log_every=1", f"--checkpoint_every={checkpoint_every}", "--val_every=100000",
            f"--strategy={strategy}"]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _start(command, log_path, env):
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            stdin=subprocess.DEVNULL)
    proc.log_file = log
    proc.log_path = log_path
    return proc


def _text(proc):
    with open(proc.log_path) as f:
        return f.read()


def _wait_for_step(proc, step, timeout=240, poll=0.2):
    """Waits until the process has logged `step` (checked every `poll` s); returns its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = _text(proc)
        if f"step {step}/" in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before step {step}:\n{text[-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s:\n{_text(proc)[-3000:]}")


def _finish(proc, timeout=300):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{_text(proc)[-3000:]}")
    finally:
        proc.log_file.close()
    return proc.returncode, _text(proc)


def _losses(text):
    """`{step: loss}` of the progress lines 'step S/N  loss L ...'."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] == "step" and parts[2] == "loss":
            out[int(parts[1].split("/")[0])] = float(parts[3])
    return out


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _assert_same_state(path_a, path_b, rtol=1e-5):
    state_a, state_b = _checkpoint_state(path_a), _checkpoint_state(path_b)
    assert state_a.keys() == state_b.keys() and len(state_a) > 10
    for key in state_a:
        np.testing.assert_allclose(state_a[key], state_b[key], rtol=rtol, atol=1e-7, err_msg=key)


# ------------------------------------------------------------------------------------------------
# kill -9
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_then_rerun_resumes_at_the_last_checkpoint(data_dir, tmp_path):
    workdir = tmp_path / "killed"
    # Enough steps that the kill lands mid-run however fast a step is (a tiny step takes
    # milliseconds: with 12 steps the run once finished between seeing step 7 and the kill).
    steps = 60
    command = _command(data_dir, workdir, steps=steps, checkpoint_every=3)
    # Bitwise reproducibility across processes needs TensorFlow's own (Eigen) CPU kernels:
    # oneDNN's, on by default (mdregnet/__init__.py), round differently under another load.
    env = _env(TF_ENABLE_ONEDNN_OPTS="0")
    proc = _start(command, tmp_path / "first.log", env)
    _wait_for_step(proc, 7, poll=0.02)  # checkpoints at 3 and 6 are on disk
    proc.send_signal(signal.SIGKILL)
    code, first = _finish(proc)
    assert code == -signal.SIGKILL
    assert f"step {steps}/" not in first and not (workdir / "model").exists()
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(workdir / "ckpt"))
    assert latest is not None
    killed_at = int(latest.rsplit("-", 1)[1])
    assert killed_at % 3 == 0 and 6 <= killed_at < steps  # the last save before the kill

    # The same command again: resumes at the checkpoint's step and runs to the end.
    code, second = _finish(_start(command, tmp_path / "second.log", env))
    assert code == 0, second[-3000:]
    assert f"resumed from {latest} at step {killed_at}" in second
    resumed = _losses(second)
    assert sorted(resumed) == list(range(killed_at + 1, steps + 1))
    assert (workdir / "model" / "config.json").exists()

    # An uninterrupted run of the same settings: the loss trajectory continues where it stopped
    # (the same pairs and weights at each step), and the final weights and Adam state agree.
    code, full = _finish(_start(_command(data_dir, tmp_path / "full", steps=steps,
                                         checkpoint_every=3), tmp_path / "full.log", env))
    assert code == 0, full[-3000:]
    full_losses = _losses(full)
    first_losses = _losses(first)
    for step in range(1, killed_at + 1):
        assert first_losses[step] == pytest.approx(full_losses[step], abs=2e-5), step
    for step in resumed:
        assert resumed[step] == pytest.approx(full_losses[step], abs=2e-5), step
    _assert_same_state(str(workdir / "ckpt" / f"ckpt-{steps}"),
                       str(tmp_path / "full" / "ckpt" / f"ckpt-{steps}"), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Two workers
# ------------------------------------------------------------------------------------------------
def _start_cluster(data_dir, workdir, steps, tmp_path, tag):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(_start(_command(data_dir, workdir, steps, batch_size=2, checkpoint_every=2,
                                     strategy="multi_worker"),
                            tmp_path / f"{tag}_worker{index}.log", _env(TF_CONFIG=tf_config)))
    return procs


@pytest.mark.slow
def test_two_workers_match_one_process_and_survive_a_lost_worker(data_dir, tmp_path):
    import tensorflow as tf

    workdir = tmp_path / "cluster"
    # 1. Two workers, global batch 2 (1 per worker), 4 steps.
    results = [_finish(p) for p in _start_cluster(data_dir, workdir, 4, tmp_path, "a")]
    for code, text in results:
        assert code == 0, text[-3000:]
        assert "global batch 2 on 2 replica(s) (multi_worker)" in text
    # Only the chief writes: checkpoints, logs and the model; the other worker's scratch copy of
    # the checkpoints is gone.
    assert sorted(os.listdir(workdir / "ckpt")) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
        "ckpt-4.data-00000-of-00001", "ckpt-4.index", "config.json", "history.json"]
    assert (workdir / "model" / "model.weights.h5").exists()
    assert "final model saved" in results[0][1] and "final model saved" not in results[1][1]

    # One process, default strategy, the same global batch: the same losses and the same
    # weights and Adam moments (a wrong loss scaling by the number of replicas would double the
    # first moments).
    single = train.train(_config(data_dir, tmp_path / "single", steps=4, batch_size=2,
                                 checkpoint_every=2, val_every=100000))
    for code, text in results:
        losses = _losses(text)
        assert sorted(losses) == [1, 2, 3, 4]
        for step, loss in single["loss_history"]:
            assert losses[step] == pytest.approx(loss, abs=2e-5)
    _assert_same_state(str(workdir / "ckpt" / "ckpt-4"),
                       str(tmp_path / "single" / "ckpt" / "ckpt-4"))

    # 2. Resume both for a long run, then lose worker 1 (kill -9): worker 0 stops within seconds
    # with status 75 and a one-line message naming the last checkpoint; it does not hang.
    procs = _start_cluster(data_dir, workdir, 200, tmp_path, "b")
    _wait_for_step(procs[1], 10)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code, text = _finish(procs[0], timeout=120)
    waited = time.monotonic() - killed_at
    _finish(procs[1])
    assert "resumed from" in text and "at step 4" in text
    assert code == train.EXIT_WORKER_LOST, text[-3000:]
    assert waited < 90, waited
    lines = [line for line in text.splitlines() if "lost contact with the cluster" in line]
    assert len(lines) == 1 and lines[0].startswith("mdregnet.train: error: worker 0:"), text[-2000:]
    latest = tf.train.latest_checkpoint(str(workdir / "ckpt"))
    saved = int(latest.rsplit("-", 1)[1])
    assert saved >= 8 and f"the last complete checkpoint is {latest}" in lines[0]
    assert not (workdir / "model" / "config.json").exists() or saved < 200

    # 3. Restart both with the same command (a few more steps): both resume at the chief's step.
    results = [_finish(p) for p in _start_cluster(data_dir, workdir, saved + 2, tmp_path, "c")]
    for code, text in results:
        assert code == 0, text[-3000:]
        assert f"at step {saved}" in text and sorted(_losses(text)) == [saved + 1, saved + 2]
    assert tf.train.latest_checkpoint(str(workdir / "ckpt")).endswith(f"ckpt-{saved + 2}")


# ------------------------------------------------------------------------------------------------
# Unwritable run directory, full disk
# ------------------------------------------------------------------------------------------------
def test_unwritable_workdir_is_a_one_line_error_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    workdir = blocker / "run"  # a path below a regular file: unwritable even for root
    with pytest.raises(train.OutputError, match=rf"--workdir {workdir}: cannot write there"):
        train.train(_config(data_dir, workdir, steps=1))
    proc = subprocess.run(_command(data_dir, workdir, steps=1), capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith(f"mdregnet.train: error: --workdir {workdir}: cannot write")
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_last_complete_checkpoint(data_dir, tmp_path,
                                                                         monkeypatch):
    """The second checkpoint's write fails as on a full disk (ENOSPC after part of the data is
    written): a clear error naming the last complete checkpoint, the partial files removed, and a
    rerun resumes from the complete one."""
    import tensorflow as tf

    real_write = tf.train.Checkpoint._write
    calls = []

    def failing_write(self, file_prefix, options=None):
        calls.append(file_prefix)
        if len(calls) == 2:
            with open(file_prefix + "_temp_partial", "wb") as f:
                f.write(b"\0" * 1000)
            with open(file_prefix + ".data-00000-of-00001", "wb") as f:
                f.write(b"\0" * 1000)
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{file_prefix}_temp/part-00000-of-00001.data-00000-of-00001; No "
                "space left on device")
        return real_write(self, file_prefix, options=options)

    monkeypatch.setattr(tf.train.Checkpoint, "_write", failing_write)
    workdir = tmp_path / "run"
    with pytest.raises(train.OutputError) as info:
        train.train(_config(data_dir, workdir, steps=6, checkpoint_every=2))
    message = str(info.value)
    assert "\n" not in message
    assert "cannot write the checkpoint of step 4" in message and "No space left" in message
    assert message.endswith(f"the last complete checkpoint is {workdir / 'ckpt' / 'ckpt-2'}")
    assert sorted(os.listdir(workdir / "ckpt")) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index", "config.json",
        "history.json"]
    assert not (workdir / "model").exists()

    monkeypatch.setattr(tf.train.Checkpoint, "_write", real_write)
    summary = train.train(_config(data_dir, workdir, steps=6, checkpoint_every=2))
    assert summary["resumed_from"] == 2 and summary["step"] == 6
