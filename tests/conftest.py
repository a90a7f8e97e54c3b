"""Test-suite configuration: hypothesis profiles and a deterministic, single-threaded torch."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# One thread per test process: the suite runs under `pytest -n 2` on small shared machines.
torch.set_num_threads(int(os.environ.get("IDAP_TEST_THREADS", "1")))

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("ci-long", max_examples=1000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("IDAP_HYPOTHESIS_PROFILE", "default"))
