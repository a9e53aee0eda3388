"""How OpenMP threads wait for work: set before torch loads its OpenMP runtime, named wherever a timing is kept.

Threads that wait spin briefly and then sleep (GOMP_SPINCOUNT=10000), unless the user chose a wait setting
(either variable). torch's OpenMP runtime (libgomp) reads these once, when torch is first imported, so
`vptdash/__init__.py` calls `configure` before any vptdash module imports torch. Why this spin count:
libgomp's default spins for about 300,000 iterations, and on a machine with more runnable processes than
cores (a browser, a video call, another job) a waiting thread burns the core its partner needs at every one
of a step's thousands of parallel regions. Sleeping at once (OMP_WAIT_POLICY=PASSIVE, vptdash's setting
before) is best under load, but on a quiet machine it made 2-thread steps and latency timings far slower,
and the latency a run stores is then not the one the model has on this machine. A short spin keeps most of
both. Measured side by side on a 2-core AMX Xeon (benchmarks/step_wait_policy.py; docs/performance.md,
"OpenMP wait policy"), 2-thread training steps of batch 8: quiet, 0.141 s by default, 0.213 s passive,
0.145 s with this spin (batch-1 latency 20.8, 39.7 and 23.1 ms); beside 4 spinning processes, 2.871, 0.609
and 0.776 s. One-thread work (the worker's two lanes, a sweep's processes) never waits for a partner thread
and is the same under every setting.

Imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import os
import sys

VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"

# What this process's OpenMP runtime uses, fixed by `configure` (None until then).
_in_force: str | None = None


def described() -> str:
    """The wait setting the environment holds now, as "NAME=value" pairs, or "default" (libgomp's own)."""
    return " ".join(f"{name}={os.environ[name]}" for name in VARIABLES if os.environ.get(name)) or "default"


def configure() -> str:
    """Set GOMP_SPINCOUNT unless the user set a wait variable, once per process; returns `in_force()`.

    When torch was imported before vptdash, its runtime has already read the environment as it was: this
    process keeps that setting (named as such), and only processes started from it get the new one."""
    global _in_force
    if _in_force is None:
        before = described()
        if before == "default":
            os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        _in_force = before if "torch" in sys.modules else described()
    return _in_force


def in_force() -> str:
    """The wait setting this process's OpenMP runtime read (see `configure`)."""
    return _in_force if _in_force is not None else described()
