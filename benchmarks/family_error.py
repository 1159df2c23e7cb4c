"""Family-wise error and power of the report's rule, by simulation (issue 12, item 2).

Null studies: k variants and a baseline, n seeds, every arm from one distribution plus a
shared per-seed effect (arms correlated through the seed), with normal, heavy-tailed (t, 3 df)
and skewed (centred exponential) seed noise. A study "claims" when any comparison's adjusted p
is below 0.05 (normlab.report.family.adjust; the report also needs both intervals to exclude 0,
which can only lower the rate). Prints the fraction of null studies with a claim (the
family-wise error; it must stay <= 0.05 within Monte Carlo error), next to the same fraction
for raw, unadjusted sign-flip p-values; then power: the fraction of studies in which one
variant with a true effect of effect/sd = 0.5, 1, 2 is claimed (raw vs adjusted).

    python benchmarks/family_error.py [--studies 2000] [--resamples 499]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from normlab.report.family import Member, adjust

NOISES = ("normal", "t3", "skewed")


def noise(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "normal":
        return rng.normal(size=size)
    if kind == "t3":
        return rng.standard_t(3, size=size) / np.sqrt(3.0)  # unit variance
    return rng.exponential(size=size) - 1.0  # skewed, mean 0, variance 1


def study(k: int, n: int, kind: str, rng: np.random.Generator, effect: float = 0.0):
    shared = rng.normal(size=n)
    values = {}
    for a in range(k + 1):
        x = shared + noise(kind, rng, n) + (effect if a == 1 else 0.0)
        values[(None, f"a{a}")] = dict(enumerate(x.tolist()))
    members = [Member(None, f"a{a}", "a0") for a in range(1, k + 1)]
    return values, members


def rate(k: int, n: int, kind: str, studies: int, resamples: int, effect: float = 0.0):
    rng = np.random.default_rng(1000 * k + n)
    raw = adj = 0
    for r in range(studies):
        values, members = study(k, n, kind, rng, effect)
        # at least 40 permutations per comparison: the smallest adjusted p is about k / resamples
        res = adjust(values, members, n_resamples=max(resamples, 40 * k), seed=r)
        if effect:  # power: the truly different variant (a1) is claimed
            raw += res.p_values[0] < 0.05
            adj += res.adjusted[0] < 0.05
        else:  # family-wise error: any claim at all
            raw += min(res.p_values) < 0.05
            adj += min(res.adjusted) < 0.05
    return raw / studies, adj / studies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--resamples", type=int, default=499)
    args = ap.parse_args()
    mc = 2 * np.sqrt(0.05 * 0.95 / args.studies)
    print(f"null studies: {args.studies} per cell; 2 x Monte Carlo sd at 0.05 = {mc:.3f}")
    print(f"{'k':>3} {'n':>3} {'noise':>7} {'raw':>6} {'adjusted':>9}  seconds")
    t0 = time.perf_counter()
    for k in (1, 2, 4, 8, 16):
        for n in (3, 6, 9, 12):
            for kind in NOISES:
                t = time.perf_counter()
                raw, adj = rate(k, n, kind, args.studies, args.resamples)
                flag = "  <- above 0.05 + 2 sd" if adj > 0.05 + mc else ""
                print(
                    f"{k:>3} {n:>3} {kind:>7} {raw:6.3f} {adj:9.3f}  {time.perf_counter() - t:5.1f}{flag}",
                    flush=True,
                )
    print("\npower (normal noise): the variant with effect/sd is claimed")
    print(f"{'k':>3} {'n':>3} {'effect':>6} {'raw':>6} {'adjusted':>9}")
    for k in (1, 4, 12):
        for n in (6, 12):
            for effect in (0.5, 1.0, 2.0):
                raw, adj = rate(k, n, "normal", max(200, args.studies // 4), args.resamples, effect)
                print(f"{k:>3} {n:>3} {effect:6.1f} {raw:6.3f} {adj:9.3f}", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
