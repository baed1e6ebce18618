"""Test-wide settings: tests use tiny random models, which run fastest on one thread.

With two threads on a 2-core machine that is also running other work, OpenMP spin-waiting
slows tiny models by orders of magnitude; subprocesses (CLI, accelerate) inherit the setting.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
