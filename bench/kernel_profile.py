"""Where device time goes in one call: a ``jax.profiler`` trace summarised per kernel.

``kernel_summary(run, per)`` calls ``run`` once under the profiler and reads the trace back with
``jax.profiler.ProfileData``. For every accelerator plane (``/device:GPU:0``, ...) it prints the
wall time of the call, the summed kernel time on each line of the plane (busy fraction =
kernel time / wall: what is left is launch gaps and host synchronisation), and the kernels
that took the most time, with their count per ``per`` (e.g. per decode step). On a CPU-only
machine the trace has no device plane and the summary says so.

    python -m bench.sampler_throughput --models qwen2.5-1.5b --batch-sizes 64 ... --profile
"""
from __future__ import annotations

import collections
import glob
import tempfile
import time

import jax
from jax.profiler import ProfileData


def _trace(run) -> tuple[float, ProfileData]:
    directory = tempfile.mkdtemp(prefix="kernel_profile_")
    with jax.profiler.trace(directory):
        start = time.perf_counter()
        jax.block_until_ready(run())
        wall = time.perf_counter() - start
    (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    return wall, ProfileData.from_file(path)


def kernel_summary(run, per: int, label: str = "call", top: int = 25) -> str:
    """Text summary of the device kernels of one ``run()`` (already compiled and warm);
    counts are divided by ``per``."""
    wall, profile = _trace(run)
    lines_out = [f"{label}: wall {wall * 1e3:.2f} ms"]
    devices = [p for p in profile.planes if p.name.startswith("/device:") and "CPU" not in p.name]
    if not devices:
        return lines_out[0] + "; no accelerator plane in the trace"
    for plane in devices:
        for line in plane.lines:
            events = list(line.events)
            busy = sum(e.duration_ns for e in events) * 1e-9
            lines_out.append(f"  {plane.name} | {line.name}: {len(events)} events ({len(events) / per:.1f} per "
                             f"step), {busy * 1e3:.2f} ms = {busy / wall:.1%} of wall")
            if not line.name.startswith("Stream"):
                continue
            total, count = collections.Counter(), collections.Counter()
            for e in events:
                total[e.name] += e.duration_ns
                count[e.name] += 1
            for name, ns in total.most_common(top):
                lines_out.append(f"    {ns * 1e-6:8.3f} ms {ns / (busy * 1e9):6.1%}  x{count[name] / per:6.1f}/step "
                                 f"{ns / count[name] / 1e3:8.2f} us  {name[:110]}")
    return "\n".join(lines_out)
