"""`pytest -p tokenmill.testing --tokenmill-conformance=PLUGIN` passes good plugins and fails bad ones."""
import os
import re
import subprocess
import sys

from test_registry import DRAFTER_PLUGIN

GOOD_ATTENTION = """
    import torch
    from tokenmill import hookimpl
    from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend, write_kv

    class LoopAttention(TorchAttentionBackend):
        '''Token-by-token attention: a different implementation of the same contract.'''
        name = "acme-loop"

        def forward(self, q, k, v, kv_cache, md, scale, *, sliding_window=None, logits_soft_cap=None):
            n = md.num_actual_tokens
            write_kv(kv_cache[0], kv_cache[1], k[:n], v[:n], md.slot_mapping[:n])
            out = torch.zeros_like(q)
            bs = kv_cache.shape[2]
            starts = md.query_start_loc_cpu.tolist()
            group = self.num_heads // self.num_kv_heads
            for i, seq_len in enumerate(md.seq_lens_cpu.tolist()):
                for t in range(starts[i], starts[i + 1]):
                    pos = seq_len - (starts[i + 1] - t)
                    first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
                    slots = [int(md.block_tables[i, p // bs]) * bs + p % bs for p in range(first, pos + 1)]
                    keys = kv_cache[0].flatten(0, 1)[slots].float().repeat_interleave(group, 1)
                    vals = kv_cache[1].flatten(0, 1)[slots].float().repeat_interleave(group, 1)
                    scores = torch.einsum("hd,phd->hp", q[t].float(), keys) * scale
                    if logits_soft_cap is not None:
                        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
                    w = torch.softmax(scores, -1)
                    out[t] = torch.einsum("hp,phd->hd", w, vals).to(q.dtype)
            return out

    @hookimpl
    def tokenmill_register_attention_backends(register):
        register(LoopAttention)
"""

BAD_PLUGIN = """
    import torch
    from pydantic import BaseModel
    from tokenmill import Drafter, hookimpl
    from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend

    class Greedy(Drafter):
        name = "too-many"
        def propose(self, token_ids, max_num_tokens):
            return [[1, 2] for _ in token_ids]

    class NoCausalMask(TorchAttentionBackend):
        name = "no-mask"
        def forward(self, q, k, v, kv_cache, md, scale):
            out = super().forward(q, k, v, kv_cache, md, scale)
            return out + 0.1  # wrong on purpose

    class NeedsWindow(TorchAttentionBackend):
        name = "needs-window"

        class Options(BaseModel):
            window: int  # no default: the backend cannot be built from an empty attention_config

    @hookimpl
    def tokenmill_register_drafters(register):
        register(Greedy)

    @hookimpl
    def tokenmill_register_attention_backends(register):
        register(NoCausalMask)
        register(NeedsWindow)
"""


def run_suite(plugin_site, tmp_path, target):
    (tmp_path / "empty_test_dir").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site.path), *sys.path])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tokenmill.testing",
                           f"--tokenmill-conformance={target}", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "empty_test_dir")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_good_plugin_passes(plugin_site, tmp_path):
    plugin_site("acme-good", DRAFTER_PLUGIN + GOOD_ATTENTION.replace("    import torch\n    from tokenmill import hookimpl\n", "    import torch\n"))
    result = run_suite(plugin_site, tmp_path, "acme-good")
    assert result.returncode == 0, result.stdout + result.stderr
    # 6 contract checks (windows and soft caps included: the backend declares them), options for both
    assert re.search(r"\b8 passed\b", result.stdout), result.stdout


def test_bad_plugin_fails_with_the_broken_contract_named(plugin_site, tmp_path):
    plugin_site("acme-bad", BAD_PLUGIN)
    result = run_suite(plugin_site, tmp_path, "acme_bad")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "FAILED conformance[acme_bad]::drafter[too-many]::drafter_respects_bounds" in out
    assert "FAILED conformance[acme_bad]::attention_backend[no-mask]::attention_matches_reference" in out
    assert "FAILED conformance[acme_bad]::attention_backend[needs-window]::options_are_validated" in out
    assert "differs from the reference" in out and "limit 0" in out


def test_unknown_plugin_is_a_usage_error(plugin_site, tmp_path):
    result = run_suite(plugin_site, tmp_path, "nobody")
    assert result.returncode == 4
    assert "no loaded plugin of that name" in result.stderr


def test_builtin_plugins_pass_their_own_conformance_suite(plugin_site, tmp_path):
    for module in ("tokenmill.plugins.attention", "tokenmill.plugins.spec_decode", "tokenmill.plugins.structured",
                   "tokenmill.plugins.models", "tokenmill.plugins.tool_parsers"):
        result = run_suite(plugin_site, tmp_path, module)
        assert result.returncode == 0, result.stdout + result.stderr


def test_fixtures_give_a_fresh_registry_and_a_small_cpu_config(tokenmill_registry, tokenmill_config):
    assert "torch" in tokenmill_registry.available("attention_backend")
    assert tokenmill_config.device == "cpu" and tokenmill_config.cache.num_gpu_blocks_override == 64
