"""Fixtures of every test module."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """PyTorch's thread count is process-wide, and `bench --threads N` run in process (a module fixture in
    tests/benchmarks) sets it. Later modules build models in this same process and must compute as a fresh process
    does (the thread count changes the fine-tune's float rounding), so each module gives the count back."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
