"""genpipe: a reproducible pipeline for two-stage image generative models."""

import os

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads
# made CPU training ~10x slower. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
