"""One engine of ``benchmarks/peers.py`` in its own process (and its own virtualenv's python).

    PYTHON benchmarks/_peer_worker.py SPEC_JSON RESULT_FD

SPEC_JSON names the engine kind (tokenmill, vllm or llama_cpp), the model, the options it gets, the
thread count and the workload file. The worker loads the engine, warms it up (off the clock), writes
one JSON line to RESULT_FD ("ready", with the settings the engine resolved), then takes commands on
stdin, one a line, and answers each with one JSON line on RESULT_FD:

    batch    every batch prompt at once, greedy, EOS ignored: wall seconds and the output token ids
    decode   the batch-1 prompt run twice, for 1 token and for N tokens: both wall times and the ids
    quit     exit

Its own stdout and stderr (the engines' logs) go wherever the driver points them. Only the standard
library and the engine's own packages are imported here: each peer's virtualenv has nothing else.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

WARMUP_TOKENS = 4


# ---------------------------------------------------------------- engines: generate(prompts, lens) -> ids

def tokenmill_engine(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    from tokenmill import LLM, SamplingParams

    llm = LLM(spec["model"], **spec["options"])

    def generate(prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    import tokenmill
    core = llm.engine.core
    resolved = {"torch_threads": torch.get_num_threads(), "device": str(core.device),
                "dtype": str(core.dtype).removeprefix("torch."), "quantization (resolved)": core.quantization,
                "version": getattr(tokenmill, "__version__", "?"),
                "torch": torch.__version__}
    stats = llm.get_stats()
    for key in ("num_total_blocks",):
        if key in stats:
            resolved[key] = stats[key]
    for section, names in (("scheduler", ("max_num_seqs", "max_num_batched_tokens")),
                           ("cache", ("block_size", "enable_prefix_caching")),
                           ("model", ("quantization", "max_model_len"))):
        part = getattr(llm.config, section, None)
        for name in names:
            if part is not None and hasattr(part, name):
                resolved[name] = getattr(part, name)
    return generate, resolved


def vllm_engine(spec: dict):
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["options"])

    def generate(prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    resolved = {"version": vllm.__version__, "torch": torch.__version__,
                "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}}
    try:
        config = llm.llm_engine.vllm_config
        resolved.update(max_num_seqs=config.scheduler_config.max_num_seqs,
                        max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
                        block_size=config.cache_config.block_size,
                        enable_prefix_caching=config.cache_config.enable_prefix_caching,
                        dtype=str(config.model_config.dtype).removeprefix("torch."),
                        max_model_len=config.model_config.max_model_len,
                        compilation_mode=getattr(config.compilation_config.mode, "name",
                                                 str(config.compilation_config.mode)),
                        compilation_backend=config.compilation_config.backend)
    except AttributeError as e:  # a field moved: report what was read, keep running
        resolved["config_error"] = repr(e)
    return generate, resolved


def llama_cpp_engine(spec: dict):
    """llama.cpp through llama-cpp-python's C API: every sequence in one context (a KV stream per
    sequence, ``kv_unified`` off, as llama-server runs parallel slots), prompts packed into batches of
    ``n_batch`` tokens, then one ``llama_decode`` per step over every unfinished sequence; greedy is
    the argmax of the returned logits, so EOS is just another token."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    options = dict(spec["options"])
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model = L.llama_model_load_from_file(spec["model"].encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['model']}")
    params = L.llama_context_default_params()
    for name, value in options.items():
        setattr(params, name, value)
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context with {options}")
    memory = L.llama_get_memory(ctx)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    n_batch, n_seq = L.llama_n_batch(ctx), params.n_seq_max
    batch = L.llama_batch_init(n_batch, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Entries (seq, pos, token, wants logits) -> the argmax of each wanted row, in order."""
        for i, (seq, pos, token, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        batch.n_tokens = len(entries)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        wanted = sum(e[3] for e in entries)
        if not wanted:
            return np.empty(0, dtype=np.int64)
        logits = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float)),
                                       shape=(wanted, vocab))
        return logits.argmax(axis=1)

    def generate(prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        if len(prompts) > n_seq:
            raise ValueError(f"{len(prompts)} prompts, the context holds {n_seq} sequences")
        L.llama_memory_clear(memory, False)
        outputs: list[list[int]] = [[] for _ in prompts]
        for s, prompt in enumerate(prompts):  # one sequence a call: llama.cpp splits a batch evenly over its streams
            for start in range(0, len(prompt), n_batch):
                chunk = [(s, pos, prompt[pos], pos == len(prompt) - 1)
                         for pos in range(start, min(start + n_batch, len(prompt)))]
                firsts = decode(chunk)
            outputs[s].append(int(firsts[0]))
        active = [s for s in range(len(prompts)) if len(outputs[s]) < lens[s]]
        while active:
            for start in range(0, len(active), n_batch):
                part = active[start:start + n_batch]
                step = [(s, len(prompts[s]) + len(outputs[s]) - 1, outputs[s][-1], True) for s in part]
                for s, token in zip(part, decode(step)):
                    outputs[s].append(int(token))
            active = [s for s in active if len(outputs[s]) < lens[s]]
        return outputs

    resolved = {"version": L.__version__, "n_ctx": L.llama_n_ctx(ctx), "n_batch": n_batch,
                "n_ubatch": L.llama_n_ubatch(ctx), "n_seq_max": L.llama_n_seq_max(ctx),
                "n_threads": L.llama_n_threads(ctx), "n_threads_batch": L.llama_n_threads_batch(ctx),
                "system_info": L.llama_print_system_info().decode(errors="replace").strip()}
    return generate, resolved


ENGINES = {"tokenmill": tokenmill_engine, "vllm": vllm_engine, "llama_cpp": llama_cpp_engine}


# ---------------------------------------------------------------- the command loop

def main() -> None:
    spec = json.loads(sys.argv[1])
    results = os.fdopen(int(sys.argv[2]), "w", buffering=1)

    def answer(obj: dict) -> None:
        results.write(json.dumps(obj) + "\n")

    try:
        with open(spec["workload"]) as f:
            workload = json.load(f)
        prompts = workload["batch"]["prompts"][:spec["num_prompts"]]
        lens = workload["batch"]["output_lens"][:spec["num_prompts"]]
        one, one_len = workload["decode"]["prompt"], workload["decode"]["output_len"]
        began = time.perf_counter()
        generate, resolved = ENGINES[spec["kind"]](spec)
        load_s = time.perf_counter() - began
        began = time.perf_counter()  # warm-up: first-call costs (allocator, kernels, compilation) off the clock
        generate(prompts[:2], [WARMUP_TOKENS] * 2)
        generate([one], [WARMUP_TOKENS])
        answer({"ready": True, "resolved": resolved, "load_s": load_s, "warmup_s": time.perf_counter() - began,
                "pid": os.getpid()})
    except Exception as e:  # noqa: BLE001 - reported to the driver, which keeps the other engines running
        traceback.print_exc()
        answer({"error": f"{type(e).__name__}: {e}"})
        sys.exit(1)

    for line in sys.stdin:
        op = line.strip()
        try:
            if op == "batch":
                began = time.perf_counter()
                tokens = generate(prompts, lens)
                wall = time.perf_counter() - began
                if [len(t) for t in tokens] != lens:
                    raise RuntimeError("an engine made a different number of tokens than asked")
                answer({"wall_s": wall, "tokens": tokens})
            elif op == "decode":
                began = time.perf_counter()
                generate([one], [1])
                first = time.perf_counter() - began
                began = time.perf_counter()
                tokens = generate([one], [one_len])[0]
                wall = time.perf_counter() - began
                if len(tokens) != one_len:
                    raise RuntimeError(f"made {len(tokens)} tokens, asked for {one_len}")
                answer({"first_s": first, "wall_s": wall, "tokens": tokens})
            elif op == "quit":
                break
            else:
                raise ValueError(f"unknown command {op!r}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            answer({"error": f"{type(e).__name__}: {e}"})
            sys.exit(1)
    results.close()
    sys.stdout.flush()
    os._exit(0)  # engines' background threads and atexit hooks can hang a clean exit; the driver is done


if __name__ == "__main__":
    main()
