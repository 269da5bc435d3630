"""Offline throughput: tokenmill ``LLM.generate`` against HuggingFace ``generate``, one run, one workload.

    .venv/bin/python benchmarks/throughput.py                 # 64 prompts, inputs 16-512, outputs 16-256
    .venv/bin/python benchmarks/throughput.py --quick         # smoke test: 8 short prompts
    .venv/bin/python benchmarks/throughput.py --quantization none     # the GGUF expanded to fp32
    .venv/bin/python benchmarks/throughput.py --decode        # batch 1: ms per decoded token, tokenmill only
    python benchmarks/throughput.py --device cuda --shape llama3-8b     # the GPU benchmark (below)

With ``--shape`` (llama3-8b or smollm2-135m; llama-110m, a CPU-sized Llama) both engines run random weights at
that model's real shape instead: 256 prompts of 512 random token ids, 128
output tokens each, EOS ignored. transformers builds the model as
``../shared/bench/hf_baseline.py`` does and tokenmill loads the very same
tensors, so greedy agreement is reported too; HF runs static batches of
--hf-batch-size. A roofline estimate follows: for the same workload, the time
an ideal engine at batch --max-num-seqs would need, from the measured copy
bandwidth (weights + KV bytes per decode step) and matmul rate (FLOPs), and
the fraction of it tokenmill reached.

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


# ---------------------------------------------------------------- real shapes, random weights

SHAPES = {  # the dimensions of ../shared/bench/hf_baseline.py, and one CPU-sized Llama
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # a Llama small enough for CPU runs that still splits over ranks and carries adapters (tensor_parallel.py,
    # lora.py)
    "llama-110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}


def make_shape_checkpoint(shape: str, path) -> transformers.LlamaConfig:
    """config.json and a word-level tokenizer covering the vocabulary (no weights: load_format="dummy")."""
    from tokenizers import Tokenizer, models
    config = transformers.LlamaConfig(**SHAPES[shape], architectures=["LlamaForCausalLM"], bos_token_id=1,
                                      eos_token_id=2)
    config.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                                     unk_token="t0", eos_token="t2")
    tokenizer.save_pretrained(path)
    return config


def build_hf_shape(config: transformers.LlamaConfig, device: str, dtype: torch.dtype):
    """As the shared baseline builds it: every parameter N(0, 0.02), seed 0."""
    config = transformers.LlamaConfig(**config.to_dict())
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def measure_device(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting the read and the write; matmul FLOP/s in ``dtype``)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    began, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    bandwidth = 2 * n * reps / (time.perf_counter() - began)
    del src, dst
    m = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    a @ b
    _sync(device)
    began, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    _sync(device)
    return bandwidth, 2 * m ** 3 * reps / (time.perf_counter() - began)


def roofline_seconds(config: transformers.LlamaConfig, num_prompts: int, input_len: int, output_len: int,
                     batch: int, dtype_bytes: int, bandwidth: float, flops: float) -> float:
    """The time an ideal engine needs: prompts compute-bound; each decode step of ``batch`` requests
    bound by max(weight + KV bytes / bandwidth, FLOPs / matmul rate)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    per_layer = h * (h + 2 * kv_dim) + h * h + 3 * h * config.intermediate_size  # qkv, o, mlp
    matmul_params = layers * per_layer + config.vocab_size * h  # + lm_head
    weight_bytes = (layers * per_layer + config.vocab_size * h * (1 if config.tie_word_embeddings else 2)) \
        * dtype_bytes
    kv_bytes_per_token = 2 * layers * kv_dim * dtype_bytes
    attn_flops_per_pair = 4 * layers * h  # QK^T and PV per (query, key) pair
    prefill = num_prompts * (2 * (matmul_params - config.vocab_size * h) * input_len + 2 * config.vocab_size * h
                             + attn_flops_per_pair * input_len * (input_len + 1) / 2) / flops
    decode = 0.0
    for start in range(0, num_prompts, batch):
        rows = min(batch, num_prompts - start)
        for step in range(1, output_len):
            context = input_len + step
            step_bytes = weight_bytes + rows * context * kv_bytes_per_token
            step_flops = rows * (2 * matmul_params + attn_flops_per_pair * context)
            decode += max(step_bytes / bandwidth, step_flops / flops)
    return prefill + decode


def main_shape(a: argparse.Namespace) -> None:
    import tempfile
    num_prompts, input_len, output_len = a.num_prompts, a.input_len, a.output_len
    with tempfile.TemporaryDirectory() as path:
        config = make_shape_checkpoint(a.shape, path)
        device = "cuda" if a.device in ("cuda", "auto") and torch.cuda.is_available() else a.device
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        bandwidth, flops = measure_device(device, dtype)
        hf_model = build_hf_shape(config, device, dtype)
        rng = random.Random(a.seed)
        prompts = [[rng.randrange(config.vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]
        output_lens = [output_len] * num_prompts
        options = dict(device=device, dtype=str(dtype).removeprefix("torch."), load_format="dummy",
                       max_model_len=input_len + output_len, max_num_seqs=a.max_num_seqs, block_size=BLOCK_SIZE,
                       enable_prefix_caching=False, max_num_batched_tokens=max(8192, input_len))
        if not device.startswith("cuda"):
            options["num_gpu_blocks_override"] = num_prompts * (-(-(input_len + output_len) // BLOCK_SIZE)) + 1
        llm = LLM(path, **options)
        llm.engine.core.model.load_weights(hf_model.state_dict().items())  # the same tensors as HF
        print(f"shape {a.shape} (random weights) on {device} ({str(dtype).removeprefix('torch.')}); "
              f"{num_prompts} prompts x {input_len} input + {output_len} output tokens; copy bandwidth "
              f"{bandwidth / 1e9:.0f} GB/s, matmul {flops / 1e12:.1f} TFLOP/s", flush=True)
        run_tokenmill(llm, prompts[:2], [4, 4])
        run_hf(hf_model, prompts[:2], [4, 4], 2, device)
        ours_wall, ours_tokens = run_tokenmill(llm, prompts, output_lens)
        print(f"tokenmill done in {ours_wall:.1f} s; running HF generate", flush=True)
        hf_wall, hf_tokens, _ = run_hf(hf_model, prompts, output_lens, a.hf_batch_size, device)
    num_in, num_out = num_prompts * input_len, num_prompts * output_len
    rows = [Result("tokenmill", ours_wall, num_out / ours_wall, (num_in + num_out) / ours_wall),
            Result(f"HF generate (batch {a.hf_batch_size})", hf_wall, num_out / hf_wall,
                   (num_in + num_out) / hf_wall)]
    ideal = roofline_seconds(config, num_prompts, input_len, output_len, min(a.max_num_seqs, num_prompts),
                             dtype.itemsize, bandwidth, flops)
    print_table(rows)
    print(f"roofline: an ideal engine needs {ideal:.2f} s for this workload; tokenmill reached "
          f"{ideal / ours_wall:.1%} of it, HF {ideal / hf_wall:.1%}")
    same, prefix = agreement(ours_tokens, hf_tokens)
    print(f"greedy agreement: {same}/{num_prompts} requests identical to HF; {prefix:.1%} of tokens before the "
          f"first difference ({str(dtype).removeprefix('torch.')}: batch shapes change rounding)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "device": device, "gpu": torch.cuda.get_device_name() if
                       device.startswith("cuda") else None, "dtype": str(dtype).removeprefix("torch."),
                       "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
                       "max_num_seqs": a.max_num_seqs, "hf_batch_size": a.hf_batch_size,
                       "copy_bandwidth_bytes_s": bandwidth, "matmul_flop_s": flops,
                       "results": [asdict(r) for r in rows], "ratio_output_tok_s": rows[0].output_tok_s /
                       rows[1].output_tok_s, "roofline_s": ideal, "roofline_fraction": ideal / ours_wall,
                       "greedy_identical": same, "greedy_prefix_agreement": prefix}, f, indent=2)


DECODE_PROMPT_LEN, DECODE_TOKENS = 32, 64


def main_decode(a: argparse.Namespace) -> None:
    """Batch-1 decode: (time for 1 + DECODE_TOKENS tokens - time for 1) / DECODE_TOKENS, so the prompt's
    prefill and the first token's sampling drop out."""
    vocab_size = load_hf_config(resolve_model_source(a.model, "gguf")).vocab_size
    rng = random.Random(a.seed)
    prompt = [rng.randrange(vocab_size) for _ in range(DECODE_PROMPT_LEN)]
    llm = LLM(a.model, device=a.device, max_model_len=DECODE_PROMPT_LEN + 1 + DECODE_TOKENS, block_size=BLOCK_SIZE,
              enable_prefix_caching=False, quantization=a.quantization)
    run_tokenmill(llm, [prompt], [4])
    per_token = []
    for _ in range(3):
        first, _ = run_tokenmill(llm, [prompt], [1])
        whole, _ = run_tokenmill(llm, [prompt], [1 + DECODE_TOKENS])
        per_token.append((whole - first) / DECODE_TOKENS * 1000)
    print(f"model {a.model} on {llm.engine.core.device} ({str(llm.engine.core.dtype).removeprefix('torch.')}, "
          f"quantization {llm.engine.core.quantization}, {torch.get_num_threads()} threads): batch 1, "
          f"{DECODE_PROMPT_LEN}-token prompt, {min(per_token):.1f} ms per decoded token "
          f"(runs: {', '.join(f'{t:.1f}' for t in per_token)})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "quantization": llm.engine.core.quantization,
                       "num_threads": torch.get_num_threads(), "ms_per_token": min(per_token),
                       "runs_ms_per_token": per_token}, f, indent=2)


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
    ap.add_argument("--quantization", choices=["gguf", "none"], default=None,
                    help="tokenmill's option: the GGUF's block formats kept (default) or expanded (none)")
    ap.add_argument("--decode", action="store_true",
                    help=f"batch 1 instead: a {DECODE_PROMPT_LEN}-token prompt, ms per token over "
                         f"{DECODE_TOKENS} decoded ones (the best of 3), tokenmill only")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="random weights at this real shape instead of --model (the GPU benchmark)")
    ap.add_argument("--input-len", type=int, default=512, help="with --shape: every prompt's length")
    ap.add_argument("--output-len", type=int, default=128, help="with --shape: every output's length")
    a = ap.parse_args()
    if a.shape is not None:
        if "--num-prompts" not in " ".join(__import__("sys").argv):
            a.num_prompts = 256
        if "--hf-batch-size" not in " ".join(__import__("sys").argv):
            a.hf_batch_size = 128 if a.shape == "llama3-8b" else 256
        return a
    if a.quick:
        a.num_prompts, a.max_input_len, a.max_output_len, a.hf_batch_size = 8, 64, 24, 4
    if a.max_input_len < MIN_LEN or a.max_output_len < MIN_LEN:
        ap.error(f"--max-input-len and --max-output-len must be >= {MIN_LEN}")
    return a


def main() -> None:
    a = parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.shape is not None:
        return main_shape(a)
    if a.decode:
        return main_decode(a)
    source = resolve_model_source(a.model, "gguf")
    prompts, output_lens = make_workload(a.num_prompts, a.max_input_len, a.max_output_len,
                                         load_hf_config(source).vocab_size, a.seed)
    # a KV cache that holds every request at full length: no preemption, as HF never preempts
    num_blocks = sum(-(-(len(p) + n) // BLOCK_SIZE) for p, n in zip(prompts, output_lens)) + a.num_prompts + 1
    llm = LLM(a.model, device=a.device, max_model_len=a.max_input_len + a.max_output_len,
              max_num_seqs=a.max_num_seqs, block_size=BLOCK_SIZE, num_gpu_blocks_override=num_blocks,
              enable_prefix_caching=False, quantization=a.quantization)
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
