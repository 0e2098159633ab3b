"""Long fuzz run of the TIFF reading path: random and mutated bytes, counting cases, crashes
(any exception other than DataError), the slowest case and the peak memory (a hostile header
must not make the readers allocate gigabytes).

    python bench/fuzz_tiff.py --seconds=600
"""

from __future__ import annotations

import argparse
import resource
import time
import traceback

import numpy as np

from lggunet import fuzzing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    seeds = fuzzing.valid_tiffs()
    cases = crashes = 0
    slowest = 0.0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        if rng.random() < 0.2:
            data = rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
        else:
            data = fuzzing.mutate(
                seeds[int(rng.integers(0, len(seeds)))], rng, int(rng.integers(1, 9))
            )
        t = time.perf_counter()
        try:
            fuzzing.read_all_ways(data)
        except Exception:  # noqa: BLE001 - that is the point
            crashes += 1
            traceback.print_exc()
        slowest = max(slowest, time.perf_counter() - t)
        cases += 1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"fuzz_tiff: {cases} cases in {args.seconds:.0f} s, {crashes} crashes, "
        f"slowest {slowest * 1e3:.1f} ms, peak memory {peak_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
