"""Test setup: the Triton interpreter on machines without a GPU (set before triton is imported),
deterministic seeds, and small shared fixtures."""
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The GPU script reruns the parity tests with FMF_MATMUL_PRECISION=high (TF32 matmuls; see tolerances.py).
if os.environ.get("FMF_MATMUL_PRECISION"):
    torch.set_float32_matmul_precision(os.environ["FMF_MATMUL_PRECISION"])

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def free_port() -> int:
    """A TCP port on localhost that nothing listens on, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on a lent GPU machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on the CI CPU")
