"""vptdash: how many visual prompts do we really need, and where?

The library behind the dashboard: backbones, data, prompt tuning, training, cost, run store.
Importable and usable without Streamlit.
"""

import os

# How OpenMP threads wait (a short spin unless the user chose): torch's OpenMP runtime reads it once, when
# torch is first imported, so it is set here, before any vptdash module imports torch. Why this setting:
# vptdash.engine.openmp.
from vptdash.engine import openmp as _openmp  # imports no torch

_openmp.configure()

# torch.compile's cache (long runs compile their step: vptdash.engine.compiled) beside vptdash's other
# caches unless the user chose one. Set before torch is imported: inductor fixes its default (a folder in
# /tmp, gone after a reboot) the first time anything asks for it.
from vptdash.engine import paths as _paths  # noqa: E402 - imports no torch either

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_paths.cache_location() / "inductor"))

__version__ = "0.1.0"
