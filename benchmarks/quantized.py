"""Quantized weights on CPU: the default model with its GGUF block formats kept against the same
file expanded to fp32, same run, each in its own process (so peak RSS is its own).

    .venv/bin/python benchmarks/quantized.py            # prints the table and the ratios
    .venv/bin/python benchmarks/quantized.py --quick

Per mode: weight bytes (parameters plus quantized weights, the CPU int4 layout included), peak
RSS of the process, batch-1 decode (a 32-token prompt, 128 greedy tokens, EOS ignored) in
tokens/s, and batch-64 throughput (64 prompts of 128 random token ids, 64 output tokens each) in
total tokens/s, plus the greedy agreement of the quantized outputs with the fp32 ones. The KV
cache is fixed at 256 MiB in both, so RSS differences are the weights'. Per DESIGN.md read the
ratio column, not the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

MODES = {"gguf": None, "fp32": "none"}


def run_mode(quantization: str | None, quick: bool) -> dict:
    from tokenmill import LLM, SamplingParams
    from tokenmill.layers import Embedding, Linear

    llm = LLM(quantization=quantization, kv_cache_memory_bytes=256 << 20, max_model_len=512)
    model = llm.engine.core.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes += sum(w.nbytes for m in model.modules() if isinstance(m, Linear) and m.quantized
                        for w in m.quantized)
    weight_bytes += sum(m.quantized.nbytes for m in model.modules() if isinstance(m, Embedding) and m.quantized)
    rng = random.Random(0)
    vocab = llm.engine.core.vocab_size
    out_len = 32 if quick else 128
    prompt = [rng.randrange(100, vocab) for _ in range(32)]
    decode = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    single = llm.generate([{"prompt_token_ids": prompt}], decode, use_tqdm=False)
    b1 = out_len / (time.perf_counter() - start)
    n, length, out = (8, 64, 16) if quick else (64, 128, 64)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    start = time.perf_counter()
    batch = llm.generate(prompts, params, use_tqdm=False)
    throughput = n * (length + out) / (time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"weight_mib": weight_bytes / 2**20, "peak_rss_mib": peak_rss, "b1_tok_s": b1, "b64_tok_s": throughput,
            "tokens": [single[0].outputs[0].token_ids] + [o.outputs[0].token_ids for o in batch]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(MODES[args.child], args.quick)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode] + (["--quick"] if args.quick else [])
        child = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[mode] = json.loads(child.stdout.splitlines()[-1])
    q, f = results["gguf"], results["fp32"]
    print(f"{'metric':<22}{'gguf kept':>12}{'fp32':>12}{'gguf/fp32':>12}")
    for key, label in (("weight_mib", "weight MiB"), ("peak_rss_mib", "peak RSS MiB"),
                       ("b1_tok_s", "batch-1 decode tok/s"), ("b64_tok_s", "batch-64 total tok/s")):
        print(f"{label:<22}{q[key]:>12.1f}{f[key]:>12.1f}{q[key] / f[key]:>11.2f}x")
    pairs = list(zip(q["tokens"], f["tokens"]))
    same = sum(a == b for a, b in pairs)
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in pairs]
    print(f"greedy agreement: {same}/{len(pairs)} requests identical; mean {sum(prefix) / len(prefix):.1f} tokens "
          f"before the first difference")


if __name__ == "__main__":
    main()
