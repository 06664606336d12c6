"""Suite-wide settings. The tests start many worker processes on small machines: one math thread
each keeps them from oversubscribing the cores (a 2-core machine ran 10x slower without it)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every worker the tests start

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
