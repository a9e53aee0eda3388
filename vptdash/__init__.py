"""vptdash: how many visual prompts do we really need, and where?

The library behind the dashboard: backbones, data, prompt tuning, training, cost, run store.
Importable and usable without Streamlit.
"""

import os

# OpenMP threads that wait for work sleep instead of spinning, unless the user chose otherwise. torch's
# OpenMP runtime (libgomp) reads this once, when torch is first imported, so it is set here, before any
# vptdash module imports torch. Why: by default a waiting thread spins for about 300,000 iterations, and
# on a machine with more runnable processes than cores (the dashboard's own page, a browser, another
# run) it burns the core its partner thread needs, at every one of the thousands of parallel regions
# of a step. Measured on a 2-core EPYC at load average 6-7, 2 threads, batch-8 bf16 steps of 10 deep
# prompts (benchmarks/step_wait_policy.py, one process per policy, rounds interleaved): 3.18 s per step
# by default, 0.74 s passive, 1.32 s with GOMP_SPINCOUNT=10000. The price on a quiet machine (load 1.2,
# docs/performance.md "OpenMP wait policy"): the same step 0.255 s passive against 0.182 s by default and
# 0.181 s with GOMP_SPINCOUNT=10000. Three whole meeting demos side by side differed by less than their
# run-to-run spread, so passive stays: it loses 40% at worst and wins 4x under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# torch.compile's cache (long runs compile their step: vptdash.engine.compiled) beside vptdash's other
# caches unless the user chose one. Set before torch is imported: inductor fixes its default (a folder in
# /tmp, gone after a reboot) the first time anything asks for it.
from vptdash.engine import paths as _paths  # noqa: E402 - after the OpenMP default, imports no torch

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_paths.cache_location() / "inductor"))

__version__ = "0.1.0"
