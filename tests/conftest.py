import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Flower sends anonymous usage events to telemetry.flower.ai unless told not to (read at import; inherited by
# the superlink / supernode processes the tests start): test traffic stays on loopback
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Deterministic property tests: a fixed example database-free profile, no deadlines on a noisy 2-core box.
settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
