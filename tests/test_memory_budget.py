"""The start-up KV cache budget on CUDA (core/memory.py): the arithmetic on CPU, the
profiling pass and the errors on a real device (marked gpu)."""
import pytest
import torch

from builders import TINY_CONFIGS, make_checkpoint
from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.memory import GIB, MemoryProfile, kv_cache_budget, weights_bytes

on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_budget_is_the_allowed_share_minus_what_is_in_use_and_the_activations():
    profile = MemoryProfile(total_bytes=80 * GIB, free_bytes=60 * GIB, weights_bytes=16 * GIB,
                            activation_bytes=2 * GIB)

    assert kv_cache_budget(profile, 0.9) == int(80 * GIB * 0.9) - 20 * GIB - 2 * GIB


def test_other_processes_memory_counts_against_the_budget():
    alone = MemoryProfile(80 * GIB, 60 * GIB, 16 * GIB, GIB)
    shared = MemoryProfile(80 * GIB, 50 * GIB, 16 * GIB, GIB)

    assert kv_cache_budget(alone, 0.9) - kv_cache_budget(shared, 0.9) == 10 * GIB


@pytest.mark.parametrize("free_gib, activation_gib", [(5, 1), (70, 70)])
def test_a_model_that_leaves_nothing_for_the_cache_is_an_error_naming_the_parts(free_gib, activation_gib):
    profile = MemoryProfile(80 * GIB, free_gib * GIB, 60 * GIB, activation_gib * GIB)

    with pytest.raises(ConfigError, match=r"does not fit: gpu_memory_utilization=0.9 allows 72.00 GiB of 80.00 GiB"
                                          r".*weights 60.00 GiB.*activations"):
        kv_cache_budget(profile, 0.9)


def test_weights_bytes_counts_parameters_and_buffers():
    module = torch.nn.Linear(4, 8).to(torch.bfloat16)
    module.register_buffer("table", torch.zeros(10, dtype=torch.float32))

    assert weights_bytes(module) == (4 * 8 + 8) * 2 + 10 * 4


@pytest.mark.gpu
@on_cuda
def test_cuda_engine_sizes_its_cache_from_the_profile(tmp_path):
    from tokenmill.engine_core import EngineCore

    make_checkpoint(tmp_path, TINY_CONFIGS["llama-gqa-untied"])
    core = EngineCore(EngineConfig.build(model=str(tmp_path), device="cuda", dtype="float32",
                                         gpu_memory_utilization=0.5, max_model_len=128))
    profile = core.memory_profile

    assert profile is not None and profile.activation_bytes > 0 and profile.weights_bytes > 0
    cache_bytes = sum(c.numel() * c.element_size() for c in core.kv_caches)
    assert cache_bytes <= kv_cache_budget(profile, 0.5)


@pytest.mark.gpu
@on_cuda
def test_cuda_engine_refuses_a_utilization_below_what_is_in_use(tmp_path):
    from tokenmill.engine_core import EngineCore

    make_checkpoint(tmp_path, TINY_CONFIGS["llama-gqa-untied"])
    free, total = torch.cuda.mem_get_info()
    too_low = max((total - free) / total / 2, 1e-4)
    with pytest.raises(ConfigError, match="does not fit"):
        EngineCore(EngineConfig.build(model=str(tmp_path), device="cuda", dtype="float32",
                                      gpu_memory_utilization=too_low, max_model_len=128))
