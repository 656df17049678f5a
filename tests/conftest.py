"""Test-wide settings.

Tests use small tensors, where intra-op threads cost more in synchronisation than they
save, and pytest-xdist already runs one worker per core: one torch thread per process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
