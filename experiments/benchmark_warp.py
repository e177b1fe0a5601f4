"""Benchmark of the XLA split: the warp and scaling-and-squaring compiled alone vs. plain graph.

Times, on the current device, the trilinear warp and 7-step scaling and squaring (forward and
gradient) with `jit_compile=True` on those functions only, against the same functions in a plain
`tf.function`; and a 3D convolution with and without XLA (why the convolutions are left out).
Prints a table and writes JSON. Not a test: numbers depend on the machine.

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

        for name, fn in (("warp forward", warp_fwd), ("warp gradient", warp_grad),
                         ("VecInt(7) forward", int_fwd), ("VecInt(7) gradient", int_grad)):
            rows.append({"op": name, "xla": xla, "seconds": timed(fn, args.repeats)})

    x = tf.constant(rng.random((1, *size, 2)), tf.float32)
    conv = tf.keras.layers.Conv3D(16, 3, strides=2, padding="same")
    conv(x)
    for xla in (False, True):
        fn = tf.function(lambda: conv(x), jit_compile=xla)
        rows.append({"op": "Conv3D(16, stride 2)", "xla": xla, "seconds": timed(fn, args.repeats)})

    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, size {size}")
    print(f"| {'op':<22} | {'plain graph (s)':>15} | {'XLA (s)':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 24}|{'-' * 17}|{'-' * 11}|{'-' * 10}|")
    for op in dict.fromkeys(r["op"] for r in rows):
        plain = next(r["seconds"] for r in rows if r["op"] == op and not r["xla"])
        xla = next(r["seconds"] for r in rows if r["op"] == op and r["xla"])
        print(f"| {op:<22} | {plain:>15.4f} | {xla:>9.4f} | {plain / xla:>7.2f}x |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"size": size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
