"""Benchmark of the XLA split: the warp and scaling-and-squaring compiled alone vs. plain graph.

Times, on the current device, the trilinear warp and 7-step scaling and squaring (forward and
gradient), the x2 field resize and the 3^3 Gaussian smoothing with `jit_compile=True` on those
functions only, against the same functions in a plain `tf.function`; a 3D convolution with and
without XLA (why the convolutions are left out); and, as a lever not taken by the layers,
scaling and squaring at half resolution followed by a x2 resize. Prints a table and writes JSON.
Not a test: numbers depend on the machine.

    python experiments/benchmark_warp.py --size 80,96,80 --repeats 5 --out runs/bench_warp.json
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import tensorflow as tf

from mdregnet import layers


def timed(fn, repeats):
    fn()  # trace / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _ = [np.asarray(o) for o in tf.nest.flatten(out)]
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="80,96,80", help="spatial size X,Y,Z")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    size = tuple(int(s) for s in args.size.split(","))
    rng = np.random.default_rng(0)
    image = tf.constant(rng.random((1, *size, 1)), tf.float32)
    vel = tf.Variable(rng.normal(size=(1, *size, 3)).astype(np.float32))
    half = tf.Variable(rng.normal(size=(1, *[n // 2 for n in size], 3)).astype(np.float32))

    rows = []
    for xla in (False, True):
        warp_fwd = tf.function(lambda: layers.warp(image, vel, jit_compile=xla))
        int_fwd = tf.function(lambda: layers.integrate_svf(vel, 7, jit_compile=xla))

        @tf.function
        def warp_grad():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layers.warp(image, vel, jit_compile=xla))
            return tape.gradient(loss, vel)

        @tf.function
        def int_grad():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layers.integrate_svf(vel, 7, jit_compile=xla) ** 2)
            return tape.gradient(loss, vel)

        rescale = tf.function(lambda: layers.rescale_field(half, 2, jit_compile=xla))
        smooth = tf.function(lambda: layers.gaussian_smooth(vel, 1.732, 3, jit_compile=xla))

        for name, fn in (("warp forward", warp_fwd), ("warp gradient", warp_grad),
                         ("VecInt(7) forward", int_fwd), ("VecInt(7) gradient", int_grad),
                         ("rescale x2 (field)", rescale), ("smooth 3^3 (field)", smooth)):
            rows.append({"op": name, "xla": xla, "seconds": timed(fn, args.repeats)})

    x = tf.constant(rng.random((1, *size, 2)), tf.float32)
    conv = tf.keras.layers.Conv3D(16, 3, strides=2, padding="same")
    conv(x)
    for xla in (False, True):
        fn = tf.function(lambda: conv(x), jit_compile=xla)
        rows.append({"op": "Conv3D(16, stride 2)", "xla": xla, "seconds": timed(fn, args.repeats)})

    # The lever of integrating at half resolution (as VoxelMorph's int_downsize=2; NOT what
    # MDReg-Net's layers do, which integrate the full-resolution SVF): VecInt(7) on the half grid
    # then the displacement resized x2, against VecInt(7) at full resolution (XLA both).
    coarse_fwd = tf.function(lambda: layers.rescale_field(layers.integrate_svf(half, 7), 2))

    @tf.function
    def coarse_grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layers.rescale_field(layers.integrate_svf(half, 7), 2) ** 2)
        return tape.gradient(loss, half)

    coarse = {"forward": timed(coarse_fwd, args.repeats),
              "gradient": timed(coarse_grad, args.repeats)}

    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, size {size}")
    print(f"| {'op':<22} | {'plain graph (s)':>15} | {'XLA (s)':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 24}|{'-' * 17}|{'-' * 11}|{'-' * 10}|")
    for op in dict.fromkeys(r["op"] for r in rows):
        plain = next(r["seconds"] for r in rows if r["op"] == op and not r["xla"])
        xla = next(r["seconds"] for r in rows if r["op"] == op and r["xla"])
        print(f"| {op:<22} | {plain:>15.4f} | {xla:>9.4f} | {plain / xla:>7.2f}x |")
    for kind, seconds in coarse.items():
        full = next(r["seconds"] for r in rows if r["op"] == f"VecInt(7) {kind}" and r["xla"])
        print(f"VecInt(7) {kind} at 1/2 resolution + rescale x2: {seconds:.4f} s "
              f"({full / seconds:.1f}x faster than at full resolution)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"size": size, "rows": rows, "coarse_integration": coarse}, f, indent=2)


if __name__ == "__main__":
    main()
