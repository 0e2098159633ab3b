"""Where a training loop's step time goes between the device and the host, from the trace that
`profile.first_step` / `profile.steps` make (lggunet.profiling): what each step launches,
how long the host spends in it, and how long the device sits idle.

    python run.py --config=configs/gpu.py ... --config.profile.first_step=300 \\
        --config.profile.steps=20 --workdir=W
    python bench/profile_loop.py W            # one JSON line

bench/device_check.py traces its timed run this way and adds these figures to its "run" line.

Per step (the "train" marks: fetching the batch and launching the step; the window's first
step, whose batch is fetched before the trace starts, left out): the period from one
step's mark to the next (median) and the window's wall time over its steps, the host time
inside the mark, and the jitted functions it called (`PjitFunction(name)`, outermost calls
only). The host time includes waiting for the previous step's metrics (the loop reads step
N-1's loss while step N runs), so where the device is the bottleneck it is about the step
time; the device's idle time is the figure of host overhead. A window across an epoch's end
holds its evaluation too (in the window's wall time and the device's idle time; the median
period is robust to it): choose a window inside one epoch. On a GPU, over the traced span:
kernel time (the union of kernel intervals on the device's streams) and idle time per traced
step (the first included), and the longest gaps.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import statistics
import sys
from pathlib import Path

STEP_NAME = "train"  # lggunet.profiling.STEP_NAME
DERIVED_LINES = ("XLA", "Steps", "Framework", "Source", "Launch", "Task")


def find_trace(workdir: Path) -> Path:
    """The newest trace under `workdir/tensorboard/plugins/profile/`; exits if none."""
    traces = sorted(
        (workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"),
        key=lambda p: p.stat().st_mtime,
    )
    if not traces:
        sys.exit(f"{workdir}: no trace (train with --config.profile.first_step=N)")
    return traces[-1]


def _outermost(events: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Events not inside an earlier one of the same name (jit calls nest in the trace)."""
    out, open_until = [], {}
    for start, end, name in sorted(events):
        if start < open_until.get(name, -1):
            continue
        out.append((start, end, name))
        open_until[name] = end
    return out


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def _step_at(t: int, starts: list[int], steps: list[int]) -> int | None:
    """The step of `steps` (launched at `starts`, ascending) last launched at or before `t`;
    None before the first."""
    i = bisect.bisect_right(starts, t)
    return steps[i - 1] if i else None


def loop_profile(path: Path) -> dict:
    """The figures of one trace file (see the module docstring)."""
    from jax.profiler import ProfileData

    profile = ProfileData.from_file(str(path))
    marks, calls, kernels = [], [], collections.defaultdict(list)
    for plane in profile.planes:
        for line in plane.lines:
            if plane.name.startswith("/host:"):
                for e in line.events:
                    if e.name == STEP_NAME:
                        step = int(float(dict(e.stats).get("step_num", -1)))
                        marks.append((e.start_ns, e.start_ns + e.duration_ns, step))
                    elif e.name.startswith("PjitFunction("):
                        calls.append((e.start_ns, e.start_ns + e.duration_ns, e.name[13:-1]))
            elif plane.name.startswith("/device:") and not line.name.startswith(DERIVED_LINES):
                kernels[plane.name] += [
                    (e.start_ns, e.start_ns + e.duration_ns) for e in line.events
                ]
    if not marks:
        sys.exit(f"{path}: no '{STEP_NAME}' step marks in the trace")
    # A step's number can be marked twice: an epoch's last fetch finds no batch (a mark that
    # launches nothing) and the next epoch's first fetch launches it. Merged per number.
    marks.sort()
    calls = _outermost(calls)
    steps: dict[int, dict] = {}
    for start, end, step in marks:
        entry = steps.setdefault(
            step, {"start": start, "host_ns": 0, "calls": collections.Counter()}
        )
        entry["host_ns"] += end - start
        called = [n for s, _, n in calls if start <= s < end]
        if called and not entry["calls"]:
            entry["start"] = start  # the mark that launched the step, not an epoch's last fetch
        entry["calls"].update(called)
    # The window's first batch is fetched before the trace starts (lggunet.profiling): its
    # step is left out of the host figures; its device work is in the trace, and counted.
    ran = sorted(k for k, x in steps.items() if x["calls"])
    launched = [steps[k] for k in ran[1:]]
    starts = [x["start"] for x in launched]
    window_end = max((e for _, e, k in marks if k in ran[1:]), default=0)
    periods = [(b - a) / 1e6 for a, b in zip(starts, starts[1:], strict=False)]
    total = collections.Counter()
    for x in launched:
        total.update(x["calls"])
    n = max(len(launched), 1)
    out = {
        "trace": str(path),
        "steps": ran[1:],
        "step_period_ms_median": round(statistics.median(periods), 3) if periods else None,
        "window_ms_per_step": round((window_end - starts[0]) / n / 1e6, 3) if starts else None,
        "host_ms_in_step_median": round(statistics.median(x["host_ns"] for x in launched) / 1e6, 3)
        if launched
        else None,
        "jit_calls_per_step": {k: round(c / n, 2) for k, c in total.most_common()},
        "devices": {},
    }
    for device, intervals in sorted(kernels.items()):
        if not intervals:
            continue
        intervals.sort()
        span = intervals[-1][1] - intervals[0][0]
        busy = _union_ns(intervals)
        gaps, reach = [], intervals[0][1]
        for start, end in intervals[1:]:
            if start > reach:
                gaps.append((start - reach, reach))
            reach = max(reach, end)
        out["devices"][device] = {
            "kernel_ms_per_step": round(busy / max(len(ran), 1) / 1e6, 3),
            "idle_ms_per_step": round((span - busy) / max(len(ran), 1) / 1e6, 3),
            "busy_fraction": round(busy / span, 4) if span else None,
            "longest_gaps_ms": [round(g / 1e6, 3) for g, _ in sorted(gaps)[-5:][::-1]],
            # Where the long gaps fall: (the last step launched before the gap began, its
            # length in ms), in time order; the step of a gap is approximate (host and device
            # clocks of one trace), enough to tell gaps at the window's start from spread ones.
            "gaps_over_2ms": [
                [_step_at(gap_start, starts, ran[1:]), round(g / 1e6, 3)]
                for g, gap_start in sorted(gaps, key=lambda x: x[1])
                if g > 2e6
            ],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path, help="a training workdir with a trace")
    args = ap.parse_args()
    print(json.dumps(loop_profile(find_trace(args.workdir))), flush=True)


if __name__ == "__main__":
    main()
