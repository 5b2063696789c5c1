"""Shared fixtures: deterministic seeds and an STE registry that tests may modify."""

from __future__ import annotations

import pytest
import torch

from qat_ste import ste as ste_module


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module: on a small, shared CI box two spinning threads are
    several times slower than one for these tiny tensors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ste_registry():
    """The STE registry, restored (names and order) after the test."""
    saved = dict(ste_module._REGISTRY)
    yield ste_module._REGISTRY
    ste_module._REGISTRY.clear()
    ste_module._REGISTRY.update(saved)
