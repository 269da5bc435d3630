"""Sliding-window attention and logit soft-capping in every attention path.

The contract (``AttentionBackend.forward``): the query at position p sees the
keys at positions j with p - W < j <= p; each score s = scale * q.k becomes
c * tanh(s / c) before the mask and the softmax.

    W = 5, block_size 8: the decode at position 37 sees keys 33..37
    block:     0        1        2        3        4
    key:    0 ....... 8 ...... 16 ...... 24 ...... 32 33 .. 37
    seen:                                             x  ..  x

First the reference (``reference_paged_attention``) against a brute-force dense
computation, so it is not trusted blindly; then the ``torch`` backend (decode
buckets, prompt chunks with and without a cached prefix) and the ``triton``
kernels (under the Triton interpreter on CPU: tiny shapes; the split-KV path
too) against the reference. The batch puts window edges inside blocks, a prompt
chunk across the edge, cached prefixes and a fresh prompt longer than the
window; the windows range from 1 to longer than every context. Blocks wholly
before a window (the KV cache manager frees them) are poisoned with NaN to show
they are never read, and the window and the cap must change the output at all.
"""
import math
from dataclasses import dataclass

import pytest
import torch

from tokenmill.attention import select_attention_backend
from tokenmill.errors import ConfigError
from tokenmill.plugins.attention import TorchAttentionBackend, TritonAttentionBackend
from tokenmill.plugins.attention.torch_backend import reference_paged_attention, write_kv
from tokenmill.testing.builders import make_attention_metadata, shuffled_block_tables
from tokenmill.testing.conformance import attention_honours_window_and_soft_cap

# request i: PREFIX_LENS[i] cached tokens, then QUERY_LENS[i] new ones: decodes after prefixes longer than most
# windows, a chunk after a cached prefix, a fresh prompt, two contexts of 24 (a window equal to the context)
PREFIX_LENS = [37, 19, 0, 70, 23, 0, 8]
QUERY_LENS = [1, 5, 23, 1, 1, 2, 1]
WINDOWS = [1, 5, 8, 13, 24, 71, 200]  # inside a block, one block, across blocks, = a context, = the longest, longer
SOFT_CAP = 1.5
Q_SCALE = 3.0  # queries scaled up so the scores reach a few units, where the cap bends them
TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1.5e-2, 2e-2)}


@dataclass
class Batch:
    q: torch.Tensor  # [T + padding, H, D]
    k: torch.Tensor  # [T + padding, KV, D]
    v: torch.Tensor
    cache: torch.Tensor  # [2, num_blocks, block_size, KV, D], the cached prefixes written, noise elsewhere
    md: object
    keys: list[torch.Tensor]  # request i's keys at every position of its context: [seq_len, KV, D]
    values: list[torch.Tensor]

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


def make_batch(prefix_lens=PREFIX_LENS, query_lens=QUERY_LENS, *, num_heads=6, num_kv_heads=2, head_size=16,
               block_size=8, dtype=torch.float32, seed=0, num_padding=2) -> Batch:
    """Every request's keys and values drawn densely, the prefixes written to their slots of a
    cache of noise with shuffled block tables; the new tokens' k/v are the forward's inputs."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    tables = shuffled_block_tables(seq_lens, block_size, num_blocks, gen)
    md = make_attention_metadata(query_lens, seq_lens, tables, block_size, num_padding_tokens=num_padding)
    keys = [torch.randn(s, num_kv_heads, head_size, generator=gen).to(dtype) for s in seq_lens]
    values = [torch.randn(s, num_kv_heads, head_size, generator=gen).to(dtype) for s in seq_lens]
    cache = torch.randn(TorchAttentionBackend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
                        generator=gen).to(dtype)
    for table, prefix, k, v in zip(tables, prefix_lens, keys, values):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(prefix)],
                             dtype=torch.int64)
        write_kv(cache[0], cache[1], k[:prefix], v[:prefix], slots)
    new_k = torch.cat([k[p:] for k, p in zip(keys, prefix_lens)] + [torch.zeros(num_padding, *keys[0].shape[1:])])
    new_v = torch.cat([v[p:] for v, p in zip(values, prefix_lens)] + [torch.zeros(num_padding, *keys[0].shape[1:])])
    q = (Q_SCALE * torch.randn(md.num_actual_tokens + num_padding, num_heads, head_size, generator=gen)).to(dtype)
    return Batch(q, new_k.to(dtype), new_v.to(dtype), cache, md, keys, values)


def brute_force(batch: Batch, sliding_window=None, logits_soft_cap=None) -> torch.Tensor:
    """Attention written from the definition, one (token, head) at a time, in float64, from the
    dense keys and values (no cache, no mask tensor)."""
    out = torch.zeros(batch.md.num_actual_tokens, *batch.q.shape[1:], dtype=torch.float64)
    group = batch.q.shape[1] // batch.keys[0].shape[1]
    starts = batch.md.query_start_loc_cpu.tolist()
    for i, seq_len in enumerate(batch.md.seq_lens_cpu.tolist()):
        for t in range(starts[i], starts[i + 1]):
            p = seq_len - (starts[i + 1] - t)
            first = 0 if sliding_window is None else max(p - sliding_window + 1, 0)
            for h in range(batch.q.shape[1]):
                keys = batch.keys[i][first: p + 1, h // group].double()
                values = batch.values[i][first: p + 1, h // group].double()
                scores = [batch.scale * float(batch.q[t, h].double() @ key) for key in keys]
                if logits_soft_cap is not None:
                    scores = [logits_soft_cap * math.tanh(s / logits_soft_cap) for s in scores]
                top = max(scores)
                weights = torch.tensor([math.exp(s - top) for s in scores], dtype=torch.float64)
                out[t, h] = (weights / weights.sum()) @ values
    return out


def reference(batch: Batch, **variant) -> torch.Tensor:
    return reference_paged_attention(batch.q, batch.k, batch.v, batch.cache.clone(), batch.md, batch.scale, **variant)


def torch_backend(batch: Batch) -> TorchAttentionBackend:
    _, _, _, num_kv_heads, head_size = batch.cache.shape
    return TorchAttentionBackend(num_heads=batch.q.shape[1], num_kv_heads=num_kv_heads, head_size=head_size,
                                 dtype=batch.q.dtype, device="cpu")


def triton_backend(batch: Batch, num_kv_splits: int = 1) -> TritonAttentionBackend:
    _, _, _, num_kv_heads, head_size = batch.cache.shape
    return TritonAttentionBackend(num_heads=batch.q.shape[1], num_kv_heads=num_kv_heads, head_size=head_size,
                                  dtype=batch.q.dtype, device="cpu", options={"num_kv_splits": num_kv_splits})


def run(backend, batch: Batch, cache: torch.Tensor | None = None, **variant) -> torch.Tensor:
    cache = batch.cache.clone() if cache is None else cache
    return backend.forward(batch.q, batch.k, batch.v, cache, batch.md, batch.scale, **variant)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, batch: Batch) -> None:
    n = batch.md.num_actual_tokens
    atol, rtol = TOLERANCES[batch.q.dtype]
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    torch.testing.assert_close(out[:n].float(), expected[:n].float(), atol=atol, rtol=rtol)
    assert torch.isfinite(out[n:]).all(), "padding rows must be finite"


def poison_blocks_before_windows(batch: Batch, window: int) -> torch.Tensor:
    """A copy of the cache with NaN in every block wholly before the first key its request's first
    new token sees: the blocks the KV cache manager frees behind a window (they may hold another
    request's data by the time of the step)."""
    cache = batch.cache.clone()
    block_size = cache.shape[2]
    starts = batch.md.query_start_loc_cpu.tolist()
    for i, seq_len in enumerate(batch.md.seq_lens_cpu.tolist()):
        first_query = seq_len - (starts[i + 1] - starts[i])
        for pos in range(max(first_query - window + 1, 0) // block_size * block_size):
            block = int(batch.md.block_tables[i, pos // block_size])
            cache[:, block, pos % block_size] = float("nan")
    assert torch.isnan(cache).any(), "the batch has nothing before its windows to poison"
    return cache


# ---------------------------------------------------------------- the reference, against the definition

@pytest.mark.parametrize("logits_soft_cap", [None, SOFT_CAP])
@pytest.mark.parametrize("sliding_window", [None, 1, 5, 8, 24, 200])
def test_reference_equals_the_definition(sliding_window, logits_soft_cap):
    batch = make_batch()
    expected = brute_force(batch, sliding_window, logits_soft_cap)
    out = reference(batch, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    torch.testing.assert_close(out[: batch.md.num_actual_tokens].double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_with_mha_and_blocks_of_16_equals_the_definition():
    batch = make_batch(num_heads=3, num_kv_heads=3, block_size=16)
    expected = brute_force(batch, 13, SOFT_CAP)
    out = reference(batch, sliding_window=13, logits_soft_cap=SOFT_CAP)
    torch.testing.assert_close(out[: batch.md.num_actual_tokens].double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the torch backend

@pytest.mark.parametrize("logits_soft_cap", [None, SOFT_CAP])
@pytest.mark.parametrize("sliding_window", [None, *WINDOWS])
def test_torch_backend_matches_the_reference(sliding_window, logits_soft_cap):
    batch = make_batch()
    variant = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    assert_matches(run(torch_backend(batch), batch, **variant), reference(batch, **variant), batch)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_torch_backend_with_window_and_cap_matches_the_reference(num_heads, num_kv_heads, dtype):
    batch = make_batch(num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=16, dtype=dtype)
    variant = dict(sliding_window=13, logits_soft_cap=SOFT_CAP)
    assert_matches(run(torch_backend(batch), batch, **variant), reference(batch, **variant), batch)


def test_torch_backend_layers_with_different_windows_share_one_step():
    """Gemma 2 style: local and global layers alternate within one step; each window gets its
    own plan, built once; a window no shorter than every context shares the full one."""
    batch = make_batch()
    backend = torch_backend(batch)
    batch.md.backend_state = backend.prepare(batch.md)
    cache = batch.cache.clone()
    for window in (5, None, 5, 1000, 13):
        out = run(backend, batch, cache, sliding_window=window)
        assert_matches(out, reference(batch, sliding_window=window), batch)
    assert set(batch.md.backend_state.plan.windows) == {5, 13, None}


def test_torch_decode_rows_gather_only_the_blocks_their_window_reaches():
    batch = make_batch(prefix_lens=[150, 37, 70], query_lens=[1, 1, 1], block_size=8)
    backend = torch_backend(batch)
    run(backend, batch)
    plan = batch.md.backend_state.plan
    assert [b.padded_len for b in plan.for_window(8).decode] == [16]  # at most 2 blocks of 8 for 8 keys
    assert [b.padded_len for b in plan.for_window(None).decode] == [152]


@pytest.mark.parametrize("logits_soft_cap", [None, SOFT_CAP])
def test_torch_backend_never_reads_blocks_before_the_window(logits_soft_cap):
    batch = make_batch(prefix_lens=[150, 137, 90], query_lens=[1, 9, 1])
    variant = dict(sliding_window=20, logits_soft_cap=logits_soft_cap)
    out = run(torch_backend(batch), batch, poison_blocks_before_windows(batch, 20), **variant)
    assert_matches(out, reference(batch, **variant), batch)


def test_torch_backend_rejects_a_window_below_1_and_a_cap_not_above_0():
    batch = make_batch()
    with pytest.raises(ValueError, match=r"sliding_window must be >= 1 or None, got 0"):
        run(torch_backend(batch), batch, sliding_window=0)
    with pytest.raises(ValueError, match=r"logits_soft_cap must be finite and > 0 or None, got -1.0"):
        run(torch_backend(batch), batch, logits_soft_cap=-1.0)


# ---------------------------------------------------------------- the triton kernels (interpreted on CPU)

TRITON_SHAPE = dict(num_heads=4, num_kv_heads=2, head_size=64, block_size=16)


@pytest.mark.parametrize("logits_soft_cap", [None, SOFT_CAP])
@pytest.mark.parametrize("sliding_window", [1, 5, 16, 24, 71, 200])
def test_triton_backend_matches_the_reference(sliding_window, logits_soft_cap):
    batch = make_batch(**TRITON_SHAPE)
    variant = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    assert_matches(run(triton_backend(batch), batch, **variant), reference(batch, **variant), batch)


def test_triton_soft_cap_alone_matches_the_reference():
    batch = make_batch(**TRITON_SHAPE)
    assert_matches(run(triton_backend(batch), batch, logits_soft_cap=SOFT_CAP),
                   reference(batch, logits_soft_cap=SOFT_CAP), batch)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("sliding_window,logits_soft_cap", [(20, None), (None, SOFT_CAP), (37, SOFT_CAP)])
def test_triton_split_kv_matches_the_reference(num_splits, sliding_window, logits_soft_cap):
    # 5 splits of a 20-key window leave some splits without a visible key: they must weigh nothing
    batch = make_batch([150, 37, 0, 5], [1, 1, 6, 20], **TRITON_SHAPE)
    variant = dict(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    assert_matches(run(triton_backend(batch, num_splits), batch, **variant), reference(batch, **variant), batch)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
def test_triton_queries_spanning_several_tiles_start_at_their_own_window(num_heads, num_kv_heads):
    # 70 new tokens after 21 cached: several q-tiles, each skipping a different number of key tiles
    batch = make_batch([21, 3], [70, 1], num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=64,
                       block_size=16)
    variant = dict(sliding_window=19, logits_soft_cap=SOFT_CAP)
    assert_matches(run(triton_backend(batch), batch, **variant), reference(batch, **variant), batch)


def test_triton_bfloat16_with_window_and_cap_matches_the_reference():
    batch = make_batch(**TRITON_SHAPE, dtype=torch.bfloat16)
    variant = dict(sliding_window=13, logits_soft_cap=SOFT_CAP)
    assert_matches(run(triton_backend(batch), batch, **variant), reference(batch, **variant), batch)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_never_reads_blocks_before_the_window(num_splits):
    batch = make_batch(prefix_lens=[150, 137, 90], query_lens=[1, 9, 1], **TRITON_SHAPE)
    variant = dict(sliding_window=20, logits_soft_cap=SOFT_CAP)
    out = run(triton_backend(batch, num_splits), batch, poison_blocks_before_windows(batch, 20), **variant)
    assert_matches(out, reference(batch, **variant), batch)


def test_triton_split_count_follows_the_window():
    """A window bounds the keys a decode reads, so the heuristic splits less (SM count set by hand)."""
    backend = TritonAttentionBackend(num_heads=32, num_kv_heads=8, head_size=128, dtype=torch.bfloat16,
                                     device="cpu")
    backend._num_sms = 132
    md = make_attention_metadata([1], [8192], [list(range(512))], 16)
    assert backend.num_kv_splits_for(md) == 16
    assert backend.num_kv_splits_for(md, sliding_window=2048) == 4
    assert backend.num_kv_splits_for(md, sliding_window=512) == 1


def test_triton_wrapper_rejects_a_window_below_1_and_a_cap_not_above_0():
    from tokenmill.kernels.paged_attention import paged_attention

    batch = make_batch(**TRITON_SHAPE)
    md, n = batch.md, batch.md.num_actual_tokens
    args = dict(block_tables=md.block_tables, seq_lens=md.seq_lens, query_start_loc=md.query_start_loc,
                max_query_len=md.max_query_len, scale=batch.scale)
    out = torch.empty_like(batch.q[:n])
    with pytest.raises(ValueError, match=r"sliding_window must be >= 1 or None, got 0"):
        paged_attention(batch.q[:n], batch.cache[0], batch.cache[1], out, sliding_window=0, **args)
    with pytest.raises(ValueError, match=r"logits_soft_cap must be finite and > 0 or None, got inf"):
        paged_attention(batch.q[:n], batch.cache[0], batch.cache[1], out, logits_soft_cap=math.inf, **args)


# ---------------------------------------------------------------- the options matter

@pytest.mark.parametrize("make_backend", [torch_backend, triton_backend], ids=["torch", "triton"])
def test_the_window_and_the_cap_change_the_output(make_backend):
    """Guards against a path that accepts the keywords and ignores them: every request here has
    more context than the window, and scores large enough for the cap to bend."""
    batch = make_batch([37, 19, 70], [1, 5, 1], **TRITON_SHAPE)
    plain = run(make_backend(batch), batch)
    for variant in (dict(sliding_window=8), dict(logits_soft_cap=SOFT_CAP)):
        changed = run(make_backend(batch), batch, **variant)
        for last in (batch.md.query_start_loc_cpu[1:] - 1).tolist():  # each request's last token
            assert (changed[last] - plain[last]).abs().max() > 1e-2, f"{variant} left token {last} unchanged"


# ---------------------------------------------------------------- the conformance check

class _IgnoresTheWindow(TorchAttentionBackend):
    def forward(self, q, k, v, kv_cache, metadata, scale, *, sliding_window=None, logits_soft_cap=None):
        return super().forward(q, k, v, kv_cache, metadata, scale, logits_soft_cap=logits_soft_cap)


class _IgnoresTheCap(TorchAttentionBackend):
    def forward(self, q, k, v, kv_cache, metadata, scale, *, sliding_window=None, logits_soft_cap=None):
        return super().forward(q, k, v, kv_cache, metadata, scale, sliding_window=sliding_window)


class _DeclaresNeither(TorchAttentionBackend):
    supports_sliding_window = supports_logits_soft_cap = False

    @classmethod
    def priority(cls, device):
        return 5  # preferred over the torch backend when a model needs neither

    def forward(self, q, k, v, kv_cache, metadata, scale):
        return super().forward(q, k, v, kv_cache, metadata, scale)


@pytest.mark.parametrize("backend", [_IgnoresTheWindow, _IgnoresTheCap])
def test_conformance_check_fails_a_backend_that_ignores_an_option(backend):
    with pytest.raises(AssertionError, match="differs from the reference"):
        attention_honours_window_and_soft_cap(backend)


def test_conformance_check_has_nothing_to_check_for_a_backend_declaring_neither():
    with pytest.raises(pytest.skip.Exception, match="declares neither supports_sliding_window"):
        attention_honours_window_and_soft_cap(_DeclaresNeither)


def test_a_model_using_windows_or_caps_only_gets_a_backend_that_declares_them():
    shape = dict(device=torch.device("cpu"), dtype=torch.float32, head_size=32, block_size=16)
    backends = {"old": _DeclaresNeither, "torch": TorchAttentionBackend}
    assert select_attention_backend(backends, **shape) == "old"
    assert select_attention_backend(backends, **shape, sliding_window=True) == "torch"
    assert select_attention_backend(backends, **shape, logits_soft_cap=True) == "torch"
    with pytest.raises(ConfigError, match="'old': the model's layers use sliding windows and logit soft-capping"):
        select_attention_backend({"old": _DeclaresNeither}, **shape, sliding_window=True, logits_soft_cap=True)
