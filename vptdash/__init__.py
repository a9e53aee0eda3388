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
# by default, 0.74 s passive, 1.32 s with GOMP_SPINCOUNT=10000.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
