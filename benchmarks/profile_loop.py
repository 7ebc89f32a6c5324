"""Where a real `mapet pretrain` step spends its time: the loop under torch.profiler for a few
steps after the warm-up (compilation included in the warm-up), as JSON on stdout.

    python benchmarks/profile_loop.py [--wait 12 --active 6] -- --params P --data D --tokens T --out O

Everything after ``--`` goes to `mapet pretrain`. Reports the wall time per step, the time the
GPU was busy running kernels and copies in it (the rest of the step it waits for the host), the
host operators that take the most time and the kernels that take the most device time. The profiler steps on
DeepSpeed's ``engine.step()``, once per micro-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

with contextlib.redirect_stdout(sys.stderr):                        # stdout: the report only
    from deepspeed.runtime.engine import DeepSpeedEngine

    from mapet.cli import main as mapet


def operator_table(events, key: str, limit: int) -> list[dict]:
    rows = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:limit]
    return [{"name": event.key[:80], "calls": event.count, "self_host_ms": round(event.self_cpu_time_total / 1e3, 2),
             "self_device_ms": round(event.self_device_time_total / 1e3, 2)} for event in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=int, default=12, help="steps before profiling (compilation, warm-up)")
    parser.add_argument("--active", type=int, default=6, help="steps profiled")
    parser.add_argument("pretrain", nargs=argparse.REMAINDER, help="-- then `mapet pretrain` arguments")
    args = parser.parse_args()
    arguments = args.pretrain[1:] if args.pretrain[:1] == ["--"] else args.pretrain

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities, schedule=schedule(wait=args.wait, warmup=2, active=args.active))
    step_ends: list[float] = []
    engine_step = DeepSpeedEngine.step

    def profiled_step(self, *step_args, **step_kwargs):
        result = engine_step(self, *step_args, **step_kwargs)
        if cuda:
            torch.cuda.synchronize()
        step_ends.append(time.perf_counter())
        profiler.step()
        return result

    DeepSpeedEngine.step = profiled_step
    with profiler, contextlib.redirect_stdout(sys.stderr):
        status = mapet(["pretrain", *arguments])
    if status:
        raise SystemExit(status)

    first = args.wait + 2
    window = step_ends[first - 1:first + args.active]
    wall = (window[-1] - window[0]) / (len(window) - 1)
    events = profiler.key_averages()
    on_device = [event for event in events            # kernels and copies; ProfilerStep* is their total
                 if event.device_type == DeviceType.CUDA and not event.key.startswith("ProfilerStep")]
    on_host = [event for event in events if event.device_type == DeviceType.CPU]
    kernels = sum(event.self_device_time_total for event in on_device) / 1e6 / args.active
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps_profiled": args.active,
        "wall_s_per_step": round(wall, 4),
        "device_busy_s_per_step": round(kernels, 4),
        "device_busy_share": round(kernels / wall, 3),
        "top_host_time": operator_table(on_host, "self_cpu_time_total", 20),
        "top_device_time": operator_table(on_device, "self_device_time_total", 20),
    }, indent=1))


if __name__ == "__main__":
    main()
