"""Multi-LoRA: decode step time with 0, 1, 4 and max_loras distinct adapters in the batch, same run, same
engine, rank 16 on all seven projections, against the batch with no adapter.

    .venv/bin/python benchmarks/lora.py            # CPU: a 110M Llama shape, 32 requests, max_loras 8
    .venv/bin/python benchmarks/lora.py --quick
    python benchmarks/lora.py --device cuda --shape llama3-8b      # a lent GPU

Adapters are PEFT folders written here from random weights (N(0, 0.02) base, adapters with non-zero B),
so each adapter changes the output. A round generates ``--output-len`` greedy tokens for every request
(prompts of 32 random tokens: the time is decode steps); each configuration runs ``--rounds`` times,
alternated, and the median is reported. The target of issue 19: 4 adapters at most 1.3x the base step.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from throughput import SHAPES, build_hf_shape, make_shape_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(hf_model, folder: Path, count: int, rank: int) -> list[str]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(hf_model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                         init_lora_weights=False))
        path = folder / f"adapter{i}"
        peft_model.save_pretrained(path)
        hf_model = peft_model.unload()  # the base model back, without the adapter's layers
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="llama-110m", choices=sorted(SHAPES))
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.num_requests, args.output_len, args.rounds = 16, 8, 2
    from tokenmill import LLM, LoRARequest, SamplingParams

    with tempfile.TemporaryDirectory() as folder:
        config = make_shape_checkpoint(args.shape, folder)
        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        hf_model = build_hf_shape(config, "cpu", torch.float32)
        hf_model.save_pretrained(folder)
        paths = write_adapters(hf_model, Path(folder) / "adapters", args.max_loras, args.rank)
        del hf_model
        llm = LLM(folder, device=args.device, dtype=str(dtype).removeprefix("torch."), enable_lora=True,
                  max_loras=args.max_loras, max_lora_rank=args.rank, max_model_len=512,
                  max_num_seqs=args.num_requests, enable_prefix_caching=False,
                  **({"kv_cache_memory_bytes": 256 << 20} if args.device == "cpu" else {}))
        adapters = [LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(paths)]
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(3, config.vocab_size) for _ in range(32)]}
                   for _ in range(args.num_requests)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        layouts = {0: [None] * args.num_requests}
        for distinct in sorted({1, 4, args.max_loras}):
            layouts[distinct] = [adapters[i % distinct] for i in range(args.num_requests)]
        llm.generate(prompts, params, lora_request=layouts[max(layouts)], use_tqdm=False)  # warm-up, slots loaded
        times: dict[int, list[float]] = {k: [] for k in layouts}
        outputs: dict[int, list[list[int]]] = {}
        for _ in range(args.rounds):
            for distinct, loras in layouts.items():
                began = time.perf_counter()
                result = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
                times[distinct].append(time.perf_counter() - began)
                outputs[distinct] = [o.outputs[0].token_ids for o in result]
    base = statistics.median(times[0])
    print(f"shape {args.shape} on {args.device}: {args.num_requests} requests x {args.output_len} greedy tokens, "
          f"rank {args.rank} on {len(TARGETS)} projections, max_loras {args.max_loras}, median of {args.rounds}")
    print(f"{'adapters':>9} {'ms/step':>9} {'vs base':>8} {'rows differing from base':>25}")
    for distinct in layouts:
        step_ms = statistics.median(times[distinct]) / args.output_len * 1e3
        differ = sum(a != b for a, b in zip(outputs[distinct], outputs[0]))
        print(f"{distinct:>9} {step_ms:>9.1f} {statistics.median(times[distinct]) / base:>7.2f}x "
              f"{differ:>15}/{args.num_requests}")


if __name__ == "__main__":
    main()
