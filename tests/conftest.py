"""Shared fixtures: device parametrisation and RNG isolation."""
import pytest
import torch

import cim_ext


def cuda_available():
    return torch.cuda.is_available() and cim_ext.cuda_compiled()


#: Skips a test without a CUDA device and a CUDA build (CUDA tests also carry the `cuda` mark).
needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and build")


def cpu_and_cuda():
    """Parametrise over "cpu" and "cuda"; the CUDA case carries the `cuda` mark and skips without a GPU."""
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.random.set_rng_state(state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)
