"""Host overhead of one engine step: everything outside the model, at 256 (and 64) running requests.

    .venv/bin/python benchmarks/host_overhead.py                     # the table below
    .venv/bin/python benchmarks/host_overhead.py --profile out.prof  # plus cProfile of the first row

The real engine (``LLMEngine``: scheduler, persistent batch, attention metadata, sampler,
scheduler update, incremental detokenization with the default model's tokenizer, outputs)
runs a model plugin that computes nothing: its hidden state is the position, and its logits
are a fixed one-hot row per position that spells a paragraph of English, so greedy and
random sampling alike write realistic text. Every request decodes for the whole run
(``ignore_eos``, ``max_tokens`` past the last step), so each measured step holds exactly
the running requests of its row, one token each.

Each part is timed with perf_counter around the engine's own methods (wrapped here, not
edited), averaged over the steady-state decode steps:

    schedule   Scheduler.schedule
    inputs     ModelRunner._update_states + InputLayout.prepare (persistent batch, attention metadata)
    sample     ModelRunner._sample without the model's compute_logits (sampling metadata, sampler,
               read-back, logprobs lists)
    sampler    of which the Sampler call itself (tensor work: device time on a GPU)
    runner     the rest of ModelRunner.execute (bookkeeping after sampling)
    update     Scheduler.update_from_output
    output     OutputProcessor.process (detokenize, RequestOutputs)
    other      the rest of LLMEngine.step (engine core glue)
    HOST       the step minus the model (forward with its attention prepare, compute_logits): the
               figure the issue's target (<= 1 ms at 256 requests) is about
    host p50   the same for the median step (the mean also carries the garbage collector's pauses)

The logits are ``--vocab`` wide (default 2048, token ids the tokenizer's first 2048): on a GPU the
sampler's [B, V] tensor work is device time, and on a CPU at the real width (49152) it would swamp
the host figures. Torch runs one intra-op thread (``--threads``), as the host loop does. Per
DESIGN.md read the rows against each other (same run, same machine): each row is the best of
``--repeats`` runs, the rows interleaved.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers

from tokenmill import hookimpl
from tokenmill.config import EngineConfig
from tokenmill.llm_engine import LLMEngine
from tokenmill.loader import load_tokenizer, resolve_model_source
from tokenmill.model_base import Model
from tokenmill.output_processor import OutputKind
from tokenmill.registry import BUILTIN_PLUGINS, Registry
from tokenmill.sampling_params import SamplingParams

ARCHITECTURE = "NoComputeForCausalLM"
BLOCK_SIZE = 16
PROMPT_LEN = 128
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
    "salt and wool. Over the centuries it grew into a market town, then a port, and finally the capital of a "
    "region known for its schools, its music and its long winters. In the old quarter the streets are narrow "
    "and the houses lean towards each other, so that in some places two people can shake hands from their "
    "windows. The new town, built after the great fire, has wide roads, parks and a station where the trains "
    "from the south arrive every hour. Visitors come in the summer for the festival, when the squares fill with "
    "stages and the night is as loud as the day. "
)
# name -> (sampling params, output kind): LLM.generate asks for FINAL_ONLY outputs, a streaming server for DELTA
VARIANTS = {
    "greedy": (dict(temperature=0.0), OutputKind.FINAL_ONLY),
    "temp0.8+top_p0.95": (dict(temperature=0.8, top_p=0.95), OutputKind.FINAL_ONLY),
    "temp0.8+top_k50+top_p0.95": (dict(temperature=0.8, top_k=50, top_p=0.95), OutputKind.FINAL_ONLY),
    "greedy+logprobs5": (dict(temperature=0.0, logprobs=5), OutputKind.FINAL_ONLY),
    "greedy+stream(DELTA)": (dict(temperature=0.0), OutputKind.DELTA),
}


class NoComputeForCausalLM(Model):
    """Hidden state = position; logits = the one-hot row of the text's next token (``script_token_ids``)."""

    architectures = (ARCHITECTURE,)

    def __init__(self, hf_config, attention) -> None:
        super().__init__(hf_config, attention)
        script = torch.tensor(hf_config.script_token_ids, dtype=torch.int64)
        table = torch.zeros(len(script), hf_config.vocab_size, dtype=torch.float32)
        table[torch.arange(len(script)), script] = 30.0
        self.register_buffer("next_logits", table.roll(-1, dims=0), persistent=False)  # row p: token p + 1

    device_seconds = 0.0  # --device-ms: each forward waits this long without the GIL, like a device step

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        if self.device_seconds:
            time.sleep(self.device_seconds)
        return positions[:, None]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.next_logits[hidden[:, 0] % self.next_logits.shape[0]]

    def load_weights(self, weights) -> set[str]:
        return set()


@hookimpl
def tokenmill_register_models(register):  # this script is the model's plugin
    register(NoComputeForCausalLM)


def make_checkpoint(path: Path, vocab: int) -> list[int]:
    """The default model's tokenizer and a config for the no-compute model; returns the script's token ids."""
    tokenizer = load_tokenizer(resolve_model_source("smollm2", "gguf"))
    tokenizer.save_pretrained(path)
    special = set(tokenizer.all_special_ids)
    script = [t for t in tokenizer(TEXT, add_special_tokens=False)["input_ids"] if t < vocab and t not in special]
    transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, architectures=[ARCHITECTURE], script_token_ids=script,
    ).save_pretrained(path)
    return script


class Timers:
    """Seconds spent in wrapped methods, summed per name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, name: str) -> None:
        inner = getattr(owner, attr)
        seconds = self.seconds
        clock = time.perf_counter

        def timed(*args, **kwargs):
            began = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] += clock() - began

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.seconds.clear()


def instrument(engine: LLMEngine) -> Timers:
    timers = Timers()
    core, runner = engine.core, engine.core.runner
    timers.wrap(engine, "step", "step")
    timers.wrap(core.scheduler, "schedule", "schedule")
    timers.wrap(core.scheduler, "update_from_output", "update")
    timers.wrap(core.executor, "execute", "execute")
    timers.wrap(engine.output_processor, "process", "output")
    timers.wrap(runner, "_update_states", "update_states")
    timers.wrap(runner.inputs, "prepare", "prepare")
    timers.wrap(runner, "_model_forward", "forward")
    timers.wrap(runner.model, "compute_logits", "logits")
    timers.wrap(runner, "_sample", "sample_all")
    timers.wrap(runner, "sampler", "sampler")
    return timers


def build_engine(path: Path, device: str, max_tokens: int, **options) -> LLMEngine:
    max_model_len = PROMPT_LEN + max_tokens + BLOCK_SIZE
    blocks = 256 * -(-max_model_len // BLOCK_SIZE) + 1
    config = EngineConfig.build(model=str(path), load_format="dummy", dtype="float32", device=device,
                                max_model_len=max_model_len, block_size=BLOCK_SIZE, num_gpu_blocks_override=blocks,
                                max_num_seqs=256, max_num_batched_tokens=8192, **options)
    return LLMEngine(config, Registry(builtins=(*BUILTIN_PLUGINS, __name__), entry_points=False))


def run_row(engine: LLMEngine, timers: Timers, script: list[int], num_requests: int, options: dict,
            kind: OutputKind, warmup: int, steps: int, max_tokens: int,
            profile: cProfile.Profile | None = None) -> dict[str, float]:
    """ms per step of each part, over ``steps`` decode steps of ``num_requests`` running requests."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **options)
    ids = []
    for i in range(num_requests):  # each prompt starts at its own place in the text
        prompt = [script[(i + p) % len(script)] for p in range(PROMPT_LEN)]
        request_id = engine.next_request_id()
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params, kind)
        ids.append(request_id)
    scheduler = engine.core.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in scheduler.running):
        engine.step()  # the prompts
    for _ in range(warmup):
        engine.step()
    timers.reset()
    per_step = []
    if profile is not None:
        profile.enable()
    for _ in range(steps):
        before = timers.seconds["step"]
        engine.step()
        per_step.append(timers.seconds["step"] - before)
        if scheduler.last_step_num_tokens != num_requests or len(scheduler.running) != num_requests:
            raise RuntimeError(f"a measured step ran {scheduler.last_step_num_tokens} tokens for "
                               f"{len(scheduler.running)} requests, not {num_requests}")
    if profile is not None:
        profile.disable()
    engine.abort_request(ids)
    engine.step()  # the runner drops the aborted rows
    if engine.has_unfinished_requests():
        raise RuntimeError("requests are left after the row")
    s = {name: value * 1e3 / steps for name, value in timers.seconds.items()}
    model = s["forward"] + s["logits"]
    sample = s["sample_all"] - s["logits"]
    parts = {
        "schedule": s["schedule"],
        "inputs": s["update_states"] + s["prepare"],
        "sample": sample,
        "sampler": s["sampler"],
        "runner": s["execute"] - s["update_states"] - s["prepare"] - s["forward"] - s["sample_all"],
        "update": s["update"],
        "output": s["output"],
        "other": s["step"] - s["schedule"] - s["execute"] - s["update"] - s["output"],
        "host": s["step"] - model,
        "host median": statistics.median(per_step) * 1e3 - model,
        "model": model,
    }
    return parts


def overlap_row(engine: LLMEngine, script: list[int], num_requests: int, warmup: int, steps: int,
                max_tokens: int) -> float:
    """Wall ms per ``LLMEngine.step`` (everything, the emulated device time included) over ``steps``
    greedy decode steps of ``num_requests`` running requests."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    ids = []
    for i in range(num_requests):
        request_id = engine.next_request_id()
        engine.add_request(request_id, {"prompt_token_ids": [script[(i + p) % len(script)] for p in
                                                             range(PROMPT_LEN)]}, params, OutputKind.FINAL_ONLY)
        ids.append(request_id)
    scheduler = engine.core.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in scheduler.running):
        engine.step()
    for _ in range(warmup):
        engine.step()
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - began) * 1e3 / steps
    if len(scheduler.running) != num_requests:
        raise RuntimeError(f"{len(scheduler.running)} requests ran, not {num_requests}")
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the runner drops the aborted rows
    return ms


def overlap_table(path: Path, args, script: list[int], max_tokens: int) -> list[dict]:
    """Synchronous against ``async_scheduling=True`` with the forward taking ``--device-ms`` of device time."""
    engines = {"sync": build_engine(path, args.device, max_tokens),
               "async": build_engine(path, args.device, max_tokens, async_scheduling=True)}
    rows = []
    for device_ms in args.device_ms:
        NoComputeForCausalLM.device_seconds = device_ms / 1e3
        for num_requests in [int(b) for b in args.batches.split(",")]:
            best = {}
            for _ in range(args.repeats):  # alternated, best of the repeats
                for name, engine in engines.items():
                    ms = overlap_row(engine, script, num_requests, args.warmup, args.steps, max_tokens)
                    best[name] = min(best.get(name, ms), ms)
            host = best["sync"] - device_ms
            hidden = (best["sync"] - best["async"]) / host if host > 0 else float("nan")
            rows.append({"requests": num_requests, "device_ms": device_ms, "sync_ms": best["sync"],
                         "async_ms": best["async"], "speedup": best["sync"] / best["async"],
                         "host_hidden": hidden})
            print(f"  device {device_ms} ms, {num_requests} requests: sync {best['sync']:.2f} ms/step, "
                  f"async {best['async']:.2f} ms/step", flush=True)
    NoComputeForCausalLM.device_seconds = 0.0
    return rows


# row key -> column heading
COLUMNS = {"schedule": "schedule", "inputs": "inputs", "sample": "sample", "sampler": "sampler", "runner": "runner",
           "update": "update", "output": "output", "other": "other", "host": "HOST", "host median": "host p50",
           "model": "model"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=2048, help="logits width (the tokenizer's first ids)")
    parser.add_argument("--steps", type=int, default=100, help="measured decode steps per row")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="256,64", help="running requests of each row group")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--profile", help="write cProfile stats of the first row here")
    parser.add_argument("--json", help="also write the table here as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (the host loop is one thread; on a shared CPU more threads "
                             "wait for each other)")
    parser.add_argument("--device-ms", type=float, nargs="*", default=[],
                        help="also time whole steps, synchronous against async_scheduling=True, with each forward "
                             "taking this much emulated device time (GIL released), e.g. --device-ms 0 5 10")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_tokens = args.warmup + args.steps + 64  # decoding past the last measured step
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        script = make_checkpoint(Path(tmp), args.vocab)
        engine = build_engine(Path(tmp), args.device, max_tokens)
        overlap = overlap_table(Path(tmp), args, script, max_tokens) if args.device_ms else []
    timers = instrument(engine)
    profile = cProfile.Profile() if args.profile else None
    best: dict[tuple[int, str], dict[str, float]] = {}
    for repeat in range(args.repeats):  # rows interleaved, best of the repeats: the machine is shared and noisy
        for num_requests in batches:
            for name in variants:
                options, kind = VARIANTS[name]
                parts = run_row(engine, timers, script, num_requests, options, kind, args.warmup, args.steps,
                                max_tokens, profile)
                if profile is not None:
                    profile.dump_stats(args.profile)
                    profile = None
                print(f"  run {repeat + 1}: {num_requests:>4} {name}: host {parts['host']:.2f} ms/step", flush=True)
                key = (num_requests, name)
                if key not in best or parts["host"] < best[key]["host"]:
                    best[key] = parts
    results = [{"requests": n, "variant": name, **parts} for (n, name), parts in best.items()]
    print(f"\nms per engine step, mean of {args.steps} decode steps, best of {args.repeats} runs; device "
          f"{args.device}, vocab {args.vocab}, {torch.get_num_threads()} thread(s)")
    print(f"{'reqs':>4} {'variant':<27}" + "".join(f"{heading:>9}" for heading in COLUMNS.values()))
    for row in results:
        print(f"{row['requests']:>4} {row['variant']:<27}" + "".join(f"{row[c]:>9.3f}" for c in COLUMNS))
    if overlap:
        print("\nwhole step, wall ms (device time included): synchronous loop vs async_scheduling=True; "
              "host hidden = (sync - async) / (sync - device)")
        print(f"{'reqs':>4} {'device ms':>10} {'sync':>9} {'async':>9} {'speedup':>8} {'host hidden':>12}")
        for row in overlap:
            print(f"{row['requests']:>4} {row['device_ms']:>10.1f} {row['sync_ms']:>9.2f} {row['async_ms']:>9.2f} "
                  f"{row['speedup']:>7.2f}x {row['host_hidden']:>11.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"parts": results, "overlap": overlap}, indent=1))


if __name__ == "__main__":
    main()
