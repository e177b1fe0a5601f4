"""Peer runner of `experiments/benchmark.py`: ANTs SyN or VoxelMorph-torch on one pair, timed.

Standalone on purpose: it imports numpy and the peer only (antspyx, or torch and voxelmorph), not
mdregnet and not TensorFlow, so it can run in a virtual environment of its own (antspyx pins
numpy < 2.4; voxelmorph 0.3.x needs torch) given to the benchmark as `--peer_python`:

    python experiments/benchmark_peers.py --peer ants --pair pair.npz --out result.json \
        [--repeats 1] [--threads 2] [--device cpu|gpu|auto]

`--pair` is an `.npz` with float32 arrays 'moving' and 'fixed' `(X, Y, Z)` in [0, 1], both on the
fixed image's 1 mm-like grid (written by `benchmark.py`). The JSON result:
    status        'ok', 'not installed' (the peer cannot be imported; nothing else is measured) or
                  'error' (with 'error')
    version       the peer's version string(s); 'settings' what was run
    first_s       the first call; 'times_s' every call; 'median_s' their median (for ANTs each
                  call is a whole registration, nothing is compiled, so `--repeats 1` suffices)
    rss_peak_gib  peak resident memory of this process (VmHWM; ANTs and torch run in-process)
    gpu_peak_gib  torch's peak allocated device memory (GPU runs only)
    loadavg_start / loadavg_end   os.getloadavg() around the timed calls

Peers:
- `ants`: `ants.registration(fixed, moving, type_of_transform='SyN')` with antspyx's defaults
  (affine + SyN, Mattes MI, iterations 40x20x0), ITK threads = `--threads`; also the mean squared
  intensity difference before and after, to show that it registered the pair.
- `voxelmorph_torch`: voxelmorph 0.3.x `vxm.nn.models.VxmPairwise(ndim=3, source_channels=1,
  target_channels=1, integration_steps=7)` (the package's default U-Net, 16 features per level,
  diffeomorphic with 7 scaling-and-squaring steps; 0.3.x has no `int_downsize`: it integrates at
  full resolution), UNTRAINED weights (the cost of a forward pass does not depend on them), in
  `torch.inference_mode()`, returning the displacement and the warped moving image, copied to the
  host. Its U-Net pools 5 times, so the pair is zero-padded to multiples of 32 (176x192x176 to
  192x192x192, 80x112x80 to 96x128x96) and the outputs cropped back, as a user has to.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

PEERS = ("ants", "voxelmorph_torch")


def peak_rss_gib():
    """Peak resident set size of this process in GiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _timed_calls(fn, repeats):
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_ants(moving, fixed, repeats, threads):
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    try:
        import ants
    except ImportError as err:
        return {"status": "not installed", "error": f"antspyx: {err}"}
    fixed_img = ants.from_numpy(np.ascontiguousarray(fixed, np.float32))
    moving_img = ants.from_numpy(np.ascontiguousarray(moving, np.float32))
    last = {}
    with tempfile.TemporaryDirectory(prefix="mdregnet_bench_ants_") as tmp:
        def call():
            # antspyx defaults but for the output prefix (its default leaves files in /tmp).
            last["reg"] = ants.registration(fixed=fixed_img, moving=moving_img,
                                            type_of_transform="SyN",
                                            outprefix=os.path.join(tmp, "syn_"))

        start_load = _loadavg()
        times = _timed_calls(call, repeats)
        end_load = _loadavg()
        warped = last["reg"]["warpedmovout"].numpy()
    return {"status": "ok", "version": {"antspyx": getattr(ants, "__version__", None)},
            "settings": f"ants.registration(fixed, moving, type_of_transform='SyN'), antspyx "
                        f"defaults, {threads} ITK threads",
            "times_s": times, "loadavg_start": start_load, "loadavg_end": end_load,
            "mse_before": float(np.mean((moving - fixed) ** 2)),
            "mse_after": float(np.mean((warped - fixed) ** 2))}


def run_voxelmorph_torch(moving, fixed, repeats, threads, device):
    try:
        import torch
        import voxelmorph as vxm
    except ImportError as err:
        return {"status": "not installed", "error": f"torch/voxelmorph: {err}"}
    if not hasattr(getattr(vxm, "nn", None), "models") or \
            not hasattr(vxm.nn.models, "VxmPairwise"):
        return {"status": "not installed",
                "error": f"voxelmorph {getattr(vxm, '__version__', '?')} has no "
                         "nn.models.VxmPairwise (the PyTorch package 0.3.x is needed)"}
    torch.set_num_threads(threads)
    use_gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    if use_gpu and not torch.cuda.is_available():
        return {"status": "error", "error": "--device gpu but torch sees no CUDA device"}
    dev = torch.device("cuda" if use_gpu else "cpu")
    torch.manual_seed(0)
    model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                      integration_steps=7, device=str(dev)).to(dev).eval()
    # The U-Net pools 2x once per level and needs sizes divisible by 2**levels (32 for the
    # default 5 levels): zero-pad to the next multiple, as a user must, and crop the outputs.
    divisor = 2 ** sum(isinstance(m, torch.nn.MaxPool3d) for m in model.modules())
    pad = [((-n) % divisor // 2, (-n) % divisor - (-n) % divisor // 2) for n in moving.shape]
    crop = tuple(slice(b, b + n) for (b, _), n in zip(pad, moving.shape))

    def tensor(array):
        array = np.pad(np.asarray(array, np.float32), pad)
        return torch.from_numpy(np.ascontiguousarray(array)[None, None]).to(dev)

    source, target = tensor(moving), tensor(fixed)

    def call():
        with torch.inference_mode():
            disp, warped = model(source, target, return_warped_source=True)
            disp[(..., *crop)].cpu().numpy(), warped[(..., *crop)].cpu().numpy()

    if use_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    start_load = _loadavg()
    times = _timed_calls(call, 1 + max(1, repeats))  # the first call apart, then the repeats
    end_load = _loadavg()
    result = {"status": "ok",
              "version": {"voxelmorph": getattr(vxm, "__version__", None),
                          "torch": torch.__version__},
              "settings": f"VxmPairwise(ndim=3, integration_steps=7), package defaults otherwise, "
                          f"untrained, inference_mode, {'cuda' if use_gpu else 'cpu'}, "
                          f"{threads} torch threads, zero-padded to "
                          f"{'x'.join(str(n + sum(p)) for n, p in zip(moving.shape, pad))} "
                          f"(sizes divisible by {divisor})",
              "padded_shape": [n + sum(p) for n, p in zip(moving.shape, pad)],
              "params": int(sum(p.numel() for p in model.parameters())),
              "device": "gpu" if use_gpu else "cpu",
              "times_s": times, "loadavg_start": start_load, "loadavg_end": end_load}
    if use_gpu:
        result["gpu_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        result["gpu_name"] = torch.cuda.get_device_name(dev)
    return result


def run_peer(peer, moving, fixed, repeats=1, threads=None, device="auto"):
    """Runs one peer on the pair; returns the result dict described in the module docstring."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose one of {PEERS}")
    if not threads:
        threads = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count())
    started = time.perf_counter()
    try:
        if peer == "ants":
            result = run_ants(moving, fixed, repeats, threads)
        else:
            result = run_voxelmorph_torch(moving, fixed, repeats, threads, device)
    except Exception as err:  # a peer's failure is a row of the table, not a crash
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:500]}
    result.update(peer=peer, shape=list(moving.shape), threads=threads,
                  python=sys.executable, wall_s=time.perf_counter() - started)
    times = result.get("times_s")
    if times:
        result["first_s"] = times[0]
        rest = times[1:] if len(times) > 1 else times
        result["median_s"] = statistics.median(rest)
    result["rss_peak_gib"] = peak_rss_gib()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--pair", required=True, help=".npz with float32 'moving' and 'fixed'")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls (voxelmorph_torch: after a first call timed apart)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ITK / torch threads (default: the usable cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    args = parser.parse_args()
    with np.load(args.pair) as pair:
        moving, fixed = pair["moving"].astype(np.float32), pair["fixed"].astype(np.float32)
    result = run_peer(args.peer, moving, fixed, args.repeats, args.threads, args.device)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"{args.peer} {result['status']}: median {result.get('median_s')} s", flush=True)


if __name__ == "__main__":
    main()
