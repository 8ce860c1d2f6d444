"""Shared test setup.

Without a GPU, Triton kernels run under the interpreter on CPU tensors. TRITON_INTERPRET is read when a kernel is
decorated, so it is set here, before any test module imports wf_kernels.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def mnist_root() -> Path | None:
    """Folder holding MNIST/raw (torchvision layout): $WFNET_MNIST_ROOT, else ../shared/data beside the project."""
    for cand in (os.environ.get("WFNET_MNIST_ROOT"), ROOT.parent / "shared" / "data"):
        if cand and (Path(cand) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(cand)
    return None


@pytest.fixture
def mnist_dir():
    root = mnist_root()
    if root is None:
        pytest.skip("real MNIST not found (set WFNET_MNIST_ROOT or provide ../shared/data)")
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine every OpenMP region of a
    2-thread pool waits for a scheduler slice (measured: a 5x6 conv took 46 ms with 2 threads, 0.03 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
