"""Quantized execution, each mode in its own process (so peak memory is its own), same run.

    .venv/bin/python benchmarks/quantized.py            # CPU: the default model, GGUF kept vs fp32-expanded
    .venv/bin/python benchmarks/quantized.py --quick
    python benchmarks/quantized.py --gpu [--quick]      # a lent GPU: the Llama-3-8B shape (random weights)

CPU: the default model with its GGUF block formats kept against the same file expanded to fp32. The
KV cache is fixed at 256 MiB in both, so RSS differences are the weights'.

GPU: the Llama-3-8B shape with random weights (load_format="dummy") in bf16, with fp8 weights
(quantization="fp8"), with an fp8 KV cache (kv_cache_dtype="fp8") and with both; the KV cache is
fixed at 16 GiB in every mode, so the block count shows what fp8 KV buys.

Per mode: weight bytes (parameters plus quantized weights, the CPU int4 layout included), peak
memory (RSS on CPU, allocated device memory on a GPU), KV blocks, batch-1 decode (a 32-token
prompt, 128 greedy tokens, EOS ignored) in tokens/s, and batch-64 throughput (64 prompts of 128
random token ids, 64 output tokens each; 512 and 128 on a GPU) in total tokens/s, plus the greedy
agreement of each mode's outputs with the first mode's. Per DESIGN.md read the ratio column, not
the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

CPU_MODES = {"fp32": dict(quantization="none"), "gguf": dict(quantization=None)}
GPU_MODES = {"bf16": {}, "fp8-weights": dict(quantization="fp8"), "fp8-kv": dict(kv_cache_dtype="fp8"),
             "fp8-both": dict(quantization="fp8", kv_cache_dtype="fp8")}


def run_mode(options: dict, args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.layers import Embedding, Linear

    quick, gpu = args.quick, args.gpu
    on_cuda = gpu and args.device == "cuda"
    if gpu:
        from throughput import make_shape_checkpoint
        folder = tempfile.mkdtemp()
        make_shape_checkpoint(args.shape, folder)
        llm = LLM(folder, load_format="dummy", device=args.device, dtype="bfloat16" if on_cuda else "float32",
                  kv_cache_memory_bytes=(16 << 30) if on_cuda else (256 << 20), max_model_len=1024,
                  enable_prefix_caching=False, **options)
    else:
        llm = LLM(kv_cache_memory_bytes=256 << 20, max_model_len=512, **options)
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
    if gpu:
        n, length, out = (16, 128, 32) if quick else (64, 512, 128)
    else:
        n, length, out = (8, 64, 16) if quick else (64, 128, 64)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    start = time.perf_counter()
    batch = llm.generate(prompts, params, use_tqdm=False)
    throughput = n * (length + out) / (time.perf_counter() - start)
    if on_cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"weight_mib": weight_bytes / 2**20, "peak_mib": peak, "b1_tok_s": b1, "b64_tok_s": throughput,
            "kv_blocks": llm.get_stats()["num_total_blocks"],
            "tokens": [single[0].outputs[0].token_ids] + [o.outputs[0].token_ids for o in batch]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="the GPU modes: --shape with random weights on --device")
    ap.add_argument("--shape", default="llama3-8b", choices=["llama3-8b", "smollm2-135m"], help="with --gpu")
    ap.add_argument("--device", default="cuda", help="with --gpu (cpu runs the modes in float32, to check the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = GPU_MODES if args.gpu else CPU_MODES
    if args.child:
        print(json.dumps(run_mode(modes[args.child], args)))
        return
    results = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode, "--shape", args.shape, "--device", args.device]
        cmd += [flag for flag in ("--quick", "--gpu") if getattr(args, flag[2:])]
        child = subprocess.run(cmd, capture_output=True, text=True)
        if child.returncode:
            print(f"mode {mode} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
            continue
        results[mode] = json.loads(child.stdout.splitlines()[-1])
    if not results:
        sys.exit(1)
    names = list(results)
    base = results[names[0]]
    memory = "peak device MiB" if args.gpu and args.device == "cuda" else "peak RSS MiB"
    print(f"{'metric':<22}" + "".join(f"{m:>13}" for m in names) + "".join(f"{m + '/' + names[0]:>20}"
                                                                         for m in names[1:]))
    for key, label in (("weight_mib", "weight MiB"), ("peak_mib", memory), ("kv_blocks", "KV blocks"),
                       ("b1_tok_s", "batch-1 decode tok/s"), ("b64_tok_s", "batch total tok/s")):
        values = [results[m][key] for m in names]
        print(f"{label:<22}" + "".join(f"{v:>13.1f}" for v in values)
              + "".join(f"{v / values[0]:>19.2f}x" for v in values[1:]))
    for mode in names[1:]:
        pairs = list(zip(results[mode]["tokens"], base["tokens"]))
        same = sum(a == b for a, b in pairs)
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in pairs]
        print(f"greedy agreement {mode} vs {names[0]}: {same}/{len(pairs)} requests identical; mean "
              f"{sum(prefix) / len(prefix):.1f} tokens before the first difference")
    if len(results) < len(modes):
        sys.exit(1)


if __name__ == "__main__":
    main()
