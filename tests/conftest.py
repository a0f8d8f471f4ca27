"""What every test shares: one CPU thread per process.

The suite runs on 2 cores, usually as 2 pytest workers (`make test`: pytest-xdist, one worker per file), and its
models are tiny: a second intra-op thread per process costs more in synchronization than it gains, and OpenMP's
spinning workers next to another busy process slowed some runs tens of times. Scripts and torchrun workers the tests
start inherit OMP_NUM_THREADS (a test that sets its own keeps it).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it loads)

torch.set_num_threads(1)
