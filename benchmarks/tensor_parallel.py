"""Tensor parallelism: throughput at tensor_parallel_size 1 against 2 (and more with --sizes), same run,
greedy, on random weights: a safetensors checkpoint written once (N(0, 0.02), seed 0), so every size
runs the same model; with --dummy (the 8B shape on a GPU) each rank draws its own shard instead.

    .venv/bin/python benchmarks/tensor_parallel.py                 # CPU: a 110M Llama shape, uni vs mp
    .venv/bin/python benchmarks/tensor_parallel.py --quick
    .venv/bin/python benchmarks/tensor_parallel.py --backends mp ray
    python benchmarks/tensor_parallel.py --device cuda --shape llama3-8b --sizes 1 2 4   # a multi-GPU machine

On CPU every rank is a process with its share of the cores (gloo all-reduces over loopback between
them): on a 2-core machine expect TP 2 to lose to TP 1, since nothing is gained by splitting two cores
and every layer adds two all-reduces. The table prints what it measures, with the ratio against TP 1,
and how many requests' greedy tokens equal TP 1's (fp32 on CPU: a row-parallel sum in another order
can flip a near tie, so "identical" is expected for nearly all, not promised).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from throughput import SHAPES, build_hf_shape, make_shape_checkpoint



def run(path: str, size: int, backend: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from tokenmill import LLM, SamplingParams

    options = dict(load_format="dummy" if args.dummy else "auto", device=args.device, tensor_parallel_size=size,
                   max_model_len=1024, enable_prefix_caching=False, seed=0)
    if size > 1 or backend != "uni":
        options["distributed_executor_backend"] = backend
    if args.device == "cpu":
        options.update(dtype="float32", kv_cache_memory_bytes=256 << 20)
    began = time.perf_counter()
    llm = LLM(path, **options)
    startup = time.perf_counter() - began
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - began
    llm.shutdown()
    tokens = sum(len(p) for p in prompts) + len(prompts) * args.output_len
    return {"tok_s": tokens / elapsed, "startup_s": startup, "ids": [o.outputs[0].token_ids for o in outputs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dummy", action="store_true", help="no checkpoint: each rank draws random weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="llama-110m", choices=sorted(SHAPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=["mp"], choices=["mp", "ray"])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 8, 64, 16
    with tempfile.TemporaryDirectory() as path:
        config = make_shape_checkpoint(args.shape, path)
        if not args.dummy:
            build_hf_shape(config, "cpu", torch.float32).save_pretrained(path)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, config.vocab_size) for _ in range(args.input_len)]
                   for _ in range(args.num_prompts)]
        rows = []
        for size in args.sizes:
            for backend in (["uni"] if size == 1 else args.backends):
                rows.append((size, backend, run(path, size, backend, args, prompts)))
    base = rows[0][2]
    print(f"shape {args.shape} on {args.device}: {args.num_prompts} prompts x {args.input_len} in / "
          f"{args.output_len} out, greedy")
    print(f"{'TP':>3} {'executor':>9} {'total tok/s':>12} {'vs TP 1':>8} {'start-up s':>11} {'identical':>10}")
    for size, backend, result in rows:
        same = sum(a == b for a, b in zip(result["ids"], base["ids"]))
        print(f"{size:>3} {backend:>9} {result['tok_s']:>12.1f} {result['tok_s'] / base['tok_s']:>7.2f}x "
              f"{result['startup_s']:>11.1f} {same:>5}/{len(prompts)}")


if __name__ == "__main__":
    main()
