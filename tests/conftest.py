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


#: test modules that run OpenVINO in this process (besides tests named ..._openvino...)
_OPENVINO_MODULES = ("test_openvino.py", "test_bench_deploy.py")


def _loads_openvino(item: pytest.Item) -> bool:
    return item.path.name in _OPENVINO_MODULES or "openvino" in item.name.lower()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run OpenVINO go last. Once OpenVINO's thread pool has run in the test process, a
    later test that trains and then starts processes (tests/test_data_stream.py's two gloo ranks)
    ends the whole session with SIGSEGV (measured: test_openvino.py, then that file). The order of
    the other tests is kept."""
    items.sort(key=_loads_openvino)
