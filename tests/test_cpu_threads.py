"""``engine.cpu_threads``: torch's CPU threads while GPU runs go on (no GPU needed: only the setting)."""

from __future__ import annotations

import threading

import pytest
import torch

from batchrun.engine.cpu_threads import GPU_THREADS, few
from batchrun.errors import RuntimeFailure


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_gpu_run_holds_one_torch_thread_in_its_thread_until_its_last_run_there_ends(threads, monkeypatch):
    """torch's setting is each thread's own: a run in another thread holds it there, and runs that overlap in one
    thread (two engines' generators) put it back when the last of them ends."""
    monkeypatch.delenv("BATCHRUN_GPU_TORCH_THREADS", raising=False)
    seen = []

    def other_run():
        torch.set_num_threads(2)
        with few("cuda:0"):
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    first, second = few("cuda"), few("cuda")
    first.__enter__()
    assert torch.get_num_threads() == GPU_THREADS == 1
    second.__enter__()
    t = threading.Thread(target=other_run)
    t.start()
    t.join(10)
    assert seen == [1, 2]
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # (the second run goes on)
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == 2


def test_cpu_runs_and_zero_leave_torch_as_it_is_and_a_bad_value_is_an_error(threads, monkeypatch):
    with few("cpu"):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("BATCHRUN_GPU_TORCH_THREADS", "0")
    with few("cuda"):
        assert torch.get_num_threads() == 2
    monkeypatch.setenv("BATCHRUN_GPU_TORCH_THREADS", "3")
    with few("cuda"):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("BATCHRUN_GPU_TORCH_THREADS", "one")
    with pytest.raises(RuntimeFailure, match="BATCHRUN_GPU_TORCH_THREADS='one': expected a number"), few("cuda"):
        pass
    assert torch.get_num_threads() == 2
