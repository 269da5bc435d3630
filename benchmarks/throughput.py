"""Offline throughput: tokenmill ``LLM.generate`` against HuggingFace ``generate``, one run, one workload.

    .venv/bin/python benchmarks/throughput.py                 # 64 prompts, inputs 16-512, outputs 16-256
    .venv/bin/python benchmarks/throughput.py --quick         # smoke test: 8 short prompts

Workload (seeded): prompts of random token ids with input lengths uniform in
[16, --max-input-len] and output lengths uniform in [16, --max-output-len];
greedy, EOS ignored, so every request produces exactly its output length.
Both engines run the default model with the same weights: the transformers
reference is a ``LlamaForCausalLM`` built from tokenmill's config of the
GGUF and filled by transformers' own GGUF reader.

tokenmill takes every prompt at once (continuous batching) with a KV cache
that holds them all at full length (no preemption) and prefix caching off
(random prompts share nothing). HuggingFace runs
static batches of --hf-batch-size prompts in the given order, left-padded;
each batch generates the longest output of the batch, and only the requested
tokens count towards its tokens/s (the rest is padding waste it pays for).
Per DESIGN.md read the ratio row, not the absolute times.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from tokenmill.config import DEFAULT_MODEL
from tokenmill.llm import LLM
from tokenmill.loader import ModelSource, load_hf_config, resolve_model_source
from tokenmill.sampling_params import SamplingParams

MIN_LEN = 16
BLOCK_SIZE = 16


@dataclass(slots=True)
class Result:
    engine: str
    wall_s: float
    output_tok_s: float
    total_tok_s: float


def make_workload(num_prompts: int, max_input_len: int, max_output_len: int, vocab_size: int,
                  seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(MIN_LEN, max_input_len))]
               for _ in range(num_prompts)]
    return prompts, [rng.randint(MIN_LEN, max_output_len) for _ in range(num_prompts)]


# ---------------------------------------------------------------- tokenmill

def run_tokenmill(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - began
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    produced = [len(t) for t in tokens]
    if produced != output_lens:
        raise RuntimeError(f"tokenmill produced {produced} tokens, asked for {output_lens}")
    return wall, tokens


# ---------------------------------------------------------------- HuggingFace

def load_hf_model(source: ModelSource, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The transformers model of tokenmill's config, weights from transformers' GGUF reader
    (``from_pretrained(gguf_file=)`` would need accelerate)."""
    config = load_hf_config(source)
    config._attn_implementation = "sdpa"
    hf_model = getattr(transformers, config.architectures[0])(config).to(dtype).eval()
    tensors = load_gguf_checkpoint(str(source.gguf_path), return_tensors=True, model_to_load=hf_model)["tensors"]
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    if unexpected or missing not in ([], ["lm_head.weight"]):  # a tied lm_head is embed_tokens
        raise RuntimeError(f"HF GGUF load: missing {missing}, unexpected {unexpected}")
    return hf_model.to(device)


def hf_generate(hf_model, prompts: list[list[int]], new_tokens: int, device: str) -> list[list[int]]:
    """One static batch, left-padded; ``new_tokens`` generated for every row."""
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    out = hf_model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, asked for {new_tokens}")
    return out[:, width:].tolist()


def run_hf(hf_model, prompts: list[list[int]], output_lens: list[int], batch_size: int,
           device: str) -> tuple[float, list[list[int]], int]:
    tokens: list[list[int]] = []
    generated = 0
    with torch.inference_mode():
        _sync(device)
        began = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            lens = output_lens[i:i + batch_size]
            rows = hf_generate(hf_model, prompts[i:i + batch_size], max(lens), device)
            tokens += [row[:n] for row, n in zip(rows, lens)]
            generated += max(lens) * len(lens)
        _sync(device)
        wall = time.perf_counter() - began
    return wall, tokens, generated


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- report

def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """(requests with identical greedy ids, mean fraction of the output before the first difference)."""
    same, prefix = 0, 0.0
    for a, b in zip(ours, theirs):
        same += a == b
        common = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += common / max(len(a), 1)
    return same, prefix / max(len(ours), 1)


def print_table(rows: list[Result]) -> None:
    print(f"{'engine':<28}{'wall s':>10}{'output tok/s':>14}{'total tok/s':>13}")
    for r in rows:
        print(f"{r.engine:<28}{r.wall_s:>10.2f}{r.output_tok_s:>14.1f}{r.total_tok_s:>13.1f}")
    ours, hf = rows
    print(f"{'ratio ours/HF':<28}{hf.wall_s / ours.wall_s:>9.2f}x{ours.output_tok_s / hf.output_tok_s:>13.2f}x"
          f"{ours.total_tok_s / hf.total_tok_s:>12.2f}x")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF model: the HF reference reads it too")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (both engines)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 prompts, inputs <= 64, outputs <= 24")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if a.quick:
        a.num_prompts, a.max_input_len, a.max_output_len, a.hf_batch_size = 8, 64, 24, 4
    if a.max_input_len < MIN_LEN or a.max_output_len < MIN_LEN:
        ap.error(f"--max-input-len and --max-output-len must be >= {MIN_LEN}")
    return a


def main() -> None:
    a = parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    source = resolve_model_source(a.model, "gguf")
    prompts, output_lens = make_workload(a.num_prompts, a.max_input_len, a.max_output_len,
                                         load_hf_config(source).vocab_size, a.seed)
    # a KV cache that holds every request at full length: no preemption, as HF never preempts
    num_blocks = sum(-(-(len(p) + n) // BLOCK_SIZE) for p, n in zip(prompts, output_lens)) + a.num_prompts + 1
    llm = LLM(a.model, device=a.device, max_model_len=a.max_input_len + a.max_output_len,
              max_num_seqs=a.max_num_seqs, block_size=BLOCK_SIZE, num_gpu_blocks_override=num_blocks,
              enable_prefix_caching=False)
    device, dtype = str(llm.engine.core.device), llm.engine.core.dtype
    hf_model = load_hf_model(source, device, dtype)
    num_in, num_out = sum(map(len, prompts)), sum(output_lens)
    print(f"model {a.model} on {device} ({str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads); "
          f"{a.num_prompts} prompts, input {MIN_LEN}-{a.max_input_len} ({num_in} tokens), output "
          f"{MIN_LEN}-{a.max_output_len} ({num_out} tokens), seed {a.seed}")

    warm_prompts, warm_lens = prompts[:2], [4, 4]  # first-call costs (allocator, kernels) off the clock
    run_tokenmill(llm, warm_prompts, warm_lens)
    run_hf(hf_model, warm_prompts, warm_lens, 2, device)

    ours_wall, ours_tokens = run_tokenmill(llm, prompts, output_lens)
    num_preemptions = llm.get_stats()["num_preemptions"]
    print(f"tokenmill done in {ours_wall:.1f} s; running HF generate", flush=True)
    hf_wall, hf_tokens, hf_generated = run_hf(hf_model, prompts, output_lens, a.hf_batch_size, device)

    rows = [Result("tokenmill", ours_wall, num_out / ours_wall, (num_in + num_out) / ours_wall),
            Result(f"HF generate (batch {a.hf_batch_size})", hf_wall, num_out / hf_wall,
                   (num_in + num_out) / hf_wall)]
    print_table(rows)
    print(f"HF tok/s count only the {num_out} requested output tokens; its static batches generated "
          f"{hf_generated} ({hf_generated - num_out} past a request's length) and left-padded every prompt "
          f"to its batch's longest.")
    print(f"tokenmill: max_num_seqs {a.max_num_seqs}, {num_preemptions} preemptions")
    same, prefix = agreement(ours_tokens, hf_tokens)
    print(f"greedy agreement: {same}/{a.num_prompts} requests identical to HF; outputs agree on "
          f"{prefix:.1%} of their tokens before the first difference (fp32 with padding may differ slightly)")
    if a.json:
        settings = {k: v for k, v in vars(a).items() if k not in ("json", "quick")}
        with open(a.json, "w") as f:
            json.dump({**settings, "device": device, "dtype": str(dtype).removeprefix("torch."),
                       "num_threads": torch.get_num_threads(), "input_tokens": num_in, "output_tokens": num_out,
                       "hf_generated_tokens": hf_generated, "num_preemptions": num_preemptions,
                       "results": [asdict(r) for r in rows],
                       "ratio_output_tok_s": rows[0].output_tok_s / rows[1].output_tok_s,
                       "greedy_identical": same, "greedy_prefix_agreement": prefix}, f, indent=2)


if __name__ == "__main__":
    main()
