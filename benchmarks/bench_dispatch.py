"""Per-call overhead of registry dispatch, side by side with a direct call and torch.library.custom_op.

Each variant runs the same tiny rms_norm (so the kernel itself costs almost nothing) many times in one process;
the table reports microseconds per call and the ratio to the direct call. Absolute numbers depend on the CPU:
compare the ratios.

    python benchmarks/bench_dispatch.py [--calls 20000]
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv4_portable import ops
from dsv4_portable.reference import rms_norm


def per_call_us(fn, x, w, calls: int) -> float:
    for _ in range(200):
        fn(x, w)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x, w)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)

    @torch.library.custom_op("dsv4_bench::rms_norm", mutates_args=())
    def custom(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w, 1e-6)

    x, w = torch.randn(1, 8), torch.ones(8)
    rows = [("direct reference call", lambda a, b: rms_norm(a, b, 1e-6)),
            ("registry: ops.rms_norm (validate + select)", lambda a, b: ops.rms_norm(a, b, 1e-6)),
            ("torch.library.custom_op", custom)]
    times = [(name, per_call_us(fn, x, w, args.calls)) for name, fn in rows]
    base = times[0][1]
    print(f"{'variant':45s} {'us/call':>9s} {'x direct':>9s} {'overhead us':>12s}")
    for name, t in times:
        print(f"{name:45s} {t:9.2f} {t / base:9.2f} {t - base:12.2f}")
    reg, cus = times[1][1] - base, times[2][1] - base
    print(f"summary: registry dispatch adds {reg:.2f} us/call, custom_op adds {cus:.2f} us/call "
          f"({cus / reg:.1f}x the registry's overhead)" if reg > 0 else "summary: registry overhead not measurable")


if __name__ == "__main__":
    main()
