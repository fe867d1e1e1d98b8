"""Kendall tau-b: irtrain (Rust, `irtrain.stats`) against scipy.stats.kendalltau, in one run.

    python bench/kendall.py                 # the BENCHMARKS.md table (a few minutes)
    python bench/kendall.py --quick         # small sizes, a smoke run

Both sides use their default method (scipy's `method="auto"`: at these sizes the asymptotic
p-value; the exact one for the short traces). Cases: one pair of n = 1e6 and 1e7 observations,
without ties (continuous) and with ties (integers in 0..99), a 16 x 16 matrix over rows of 1e6
(scipy: the 120 pairs in a loop), and 10^4 short traces (pairs of n = 6 without ties: the
exact null distribution, rank's per-trace case), one call per trace on both sides.
Each time is the median of `--repeats` runs (scipy's matrix loop: `--matrix-repeats`), as
wall-clock seconds and as CPU seconds of the process (all threads). On a shared machine the
wall-clock ratio depends on how many cores the run gets; the CPU ratio is irtrain's work
against scipy's, without the benefit of parallelism. The load average is printed too.
Both give the same tau (checked to 1e-12) and p-value (1e-9 relative).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
from scipy import stats as sps

from irtrain.stats import kendall_tau, kendall_tau_matrix


def timed(fn, repeats: int):
    """(median wall seconds, median CPU seconds of the whole process: all threads), result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return (statistics.median(walls), statistics.median(cpus)), out


def scipy_tau(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = sps.kendalltau(x, y)  # scipy's default, method="auto"
    return float(r.statistic), float(r.pvalue)


def scipy_matrix(m):
    v = m.shape[0]
    tau, p = np.eye(v), np.zeros((v, v))
    for i in range(v):
        for j in range(i + 1, v):
            tau[i, j], p[i, j] = tau[j, i], p[j, i] = scipy_tau(m[i], m[j])
    return tau, p


def data(n: int, ties: bool, rng):
    if ties:
        x = rng.integers(0, 100, n).astype(np.float64)
        return x, x + rng.integers(0, 100, n)
    x = rng.standard_normal(n)
    return x, x + rng.standard_normal(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--matrix-repeats", type=int, default=1, help="repeats of scipy's (slow) matrix loop")
    ap.add_argument("--quick", action="store_true", help="n = 1e4, 1e5 and a 16 x 1e4 matrix")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sizes = [10_000, 100_000] if args.quick else [1_000_000, 10_000_000]
    mat_n = 10_000 if args.quick else 1_000_000
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<30}{'irtrain s':>11}{'scipy s':>10}{'ratio':>8}{'irtrain cpu':>13}{'scipy cpu':>11}{'cpu ratio':>11}")

    def report(case, t_ir, t_sp):
        rows.append({"case": case, "irtrain_s": t_ir[0], "scipy_s": t_sp[0], "irtrain_cpu_s": t_ir[1], "scipy_cpu_s": t_sp[1]})
        print(f"{case:<30}{t_ir[0]:>11.3f}{t_sp[0]:>10.3f}{t_sp[0] / t_ir[0]:>7.1f}x"
              f"{t_ir[1]:>13.3f}{t_sp[1]:>11.3f}{t_sp[1] / t_ir[1]:>10.1f}x", flush=True)

    for n in sizes:
        for ties in (False, True):
            x, y = data(n, ties, rng)
            t_ir, (tau, p) = timed(lambda x=x, y=y: kendall_tau(x, y), args.repeats)
            t_sp, (tau_s, p_s) = timed(lambda x=x, y=y: scipy_tau(x, y), args.repeats)
            assert abs(tau - tau_s) <= 1e-12 and abs(p - p_s) <= 1e-9 * p_s + 1e-300, (tau, tau_s, p, p_s)
            report(f"scalar n={n:.0e} {'ties' if ties else 'no ties'}", t_ir, t_sp)
    m = rng.standard_normal((16, mat_n))
    m[1::2] += m[::2]  # some association between neighbouring rows
    t_ir, (tau, _) = timed(lambda: kendall_tau_matrix(m), args.repeats)
    t_sp, (tau_s, _) = timed(lambda: scipy_matrix(m), args.matrix_repeats)
    assert np.abs(tau - tau_s).max() <= 1e-12
    report(f"matrix 16x16, n={mat_n:.0e}", t_ir, t_sp)
    traces = rng.standard_normal((1_000 if args.quick else 10_000, 2, 6))
    t_ir, ir = timed(lambda: [kendall_tau(a, b) for a, b in traces], args.repeats)
    t_sp, sp = timed(lambda: [scipy_tau(a, b) for a, b in traces], args.repeats)
    assert all(abs(u[0] - v[0]) <= 1e-12 and abs(u[1] - v[1]) <= 1e-15 * v[1] for u, v in zip(ir, sp))
    report(f"{len(traces):.0e} traces of n=6 (exact)", t_ir, t_sp)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    info = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "repeats": args.repeats, "matrix_repeats": args.matrix_repeats, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
