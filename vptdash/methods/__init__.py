"""Methods built on the engine, each a job kind of its own: attention and prompt pull, prompt
condensation, block skipping, continual learning with null-space prompts, vision-language prompts on CLIP.

Importing this package registers every built-in job kind with `vptdash.runs.jobs`, so a worker
process that imports it can execute any stored job."""

from vptdash.methods import attention, condense, continual, search, skipping, vlprompts

__all__ = ["attention", "condense", "continual", "search", "skipping", "vlprompts"]
