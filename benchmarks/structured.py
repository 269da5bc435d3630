"""Structured-output overhead: one workload with and without a JSON schema, in one run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/structured.py             # 16 prompts, 96 tokens each
    .venv/bin/python benchmarks/structured.py --quick                       # smoke test: 4 prompts, 24 tokens

Workload: --num-prompts chat prompts asking the default model to describe people
of a city as JSON, greedy, --max-tokens each. The guided run constrains them with
SCHEMA (an object holding 4 to 8 person objects: strings, a bounded integer), which
cannot be completed within 96 tokens, and the unguided run ignores EOS, so both runs
produce exactly num_prompts * max_tokens tokens with the same batch at every step:
the difference is the grammar's cost alone (the table checks the counts agree).
The runs alternate (--repeats times each, after a warm-up of both); the fastest run
of each mode is reported, and the median ratio.

Where the guided time goes, measured by wrapping (not editing) the engine's methods:
    fill bitmask   StructuredOutputManager.grammar_bitmask: one row per guided request
                   per step, filled by xgrammar's matcher (the engine thread, serial)
    apply bitmask  ModelRunner._apply_grammar: row mapping and xgrammar's masking kernel
    advance        Scheduler._advance_grammar: the emitted tokens fed to the matchers
The grammar is compiled once in the warm-up (cached by spec); its compile time is
reported separately. Target: guided >= 90% of unguided output tokens/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from tokenmill import StructuredOutputsParams
from tokenmill.config import DEFAULT_MODEL
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler import Scheduler

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 40},
                         "occupation": {"type": "string", "maxLength": 40}},
          "required": ["name", "age", "city", "occupation"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 4, "maxItems": 8}},
          "required": ["people"], "additionalProperties": False}
CITIES = ["Paris", "London", "Berlin", "Rome", "Madrid", "Vienna", "Lisbon", "Prague"]
TEMPLATES = ["Describe five people who live in {city} as JSON: name, age, city and occupation for each.",
             "Give me a JSON list of residents of {city}, with each person's name, age, city and job."]


@dataclass(slots=True)
class Result:
    mode: str
    wall_s: float
    output_tokens: int
    output_tok_s: float
    steps: int
    step_ms: float  # mean wall time of an engine step
    fill_ms: float  # per step: grammar_bitmask
    apply_ms: float  # per step: the runner's masking
    advance_ms: float  # per step: feeding emitted tokens to the matchers
    finished_by_grammar: int


class Timers:
    """Wall time and call counts of wrapped callables."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - began
                self.calls[name] += 1
        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(llm: LLM, timers: Timers) -> None:
    core = llm.engine.core
    core.step = timers.wrap("step", core.step)
    core.structured.grammar_bitmask = timers.wrap("fill", core.structured.grammar_bitmask)
    core.runner._apply_grammar = timers.wrap("apply", core.runner._apply_grammar)
    Scheduler._advance_grammar = staticmethod(timers.wrap("advance", Scheduler._advance_grammar))


def make_prompts(llm: LLM, num: int) -> list[dict]:
    questions = [TEMPLATES[(i // len(CITIES)) % len(TEMPLATES)].format(city=CITIES[i % len(CITIES)])
                 for i in range(num)]
    return [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": q}])} for q in questions]


def params_for(mode: str, max_tokens: int) -> SamplingParams:
    if mode == "unguided":
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))


def run(llm: LLM, timers: Timers, prompts: list[dict], mode: str, max_tokens: int) -> tuple[Result, list]:
    params = params_for(mode, max_tokens)
    timers.reset()
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - began
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = max(timers.calls["step"], 1)
    per_step = {name: timers.seconds[name] * 1e3 / steps for name in ("fill", "apply", "advance")}
    by_grammar = sum(o.outputs[0].finish_reason == "stop" for o in outputs) if mode == "guided" else 0
    return Result(mode, wall, tokens, tokens / wall, steps, timers.seconds["step"] * 1e3 / steps,
                  per_step["fill"], per_step["apply"], per_step["advance"], by_grammar), outputs


def print_table(best: dict[str, Result], results: dict[str, list[Result]]) -> None:
    print(f"{'mode':<10}{'wall s':>9}{'out tokens':>12}{'out tok/s':>11}{'steps':>7}{'ms/step':>9}"
          f"{'fill ms/step':>14}{'apply ms/step':>15}{'advance ms/step':>17}")
    for r in best.values():
        print(f"{r.mode:<10}{r.wall_s:>9.2f}{r.output_tokens:>12}{r.output_tok_s:>11.1f}{r.steps:>7}{r.step_ms:>9.1f}"
              f"{r.fill_ms:>14.2f}{r.apply_ms:>15.2f}{r.advance_ms:>17.2f}")
    guided, unguided = best["guided"], best["unguided"]
    ratio = guided.output_tok_s / unguided.output_tok_s
    overhead = guided.fill_ms + guided.apply_ms + guided.advance_ms
    median = (statistics.median(r.output_tok_s for r in results["guided"])
              / statistics.median(r.output_tok_s for r in results["unguided"]))
    print(f"ratio guided/unguided output tok/s: {ratio:.3f} best-of-{len(results['guided'])}, {median:.3f} median "
          f"({'meets' if ratio >= 0.9 else 'MISSES'} the 0.90 target)")
    print(f"grammar work per guided step: {overhead:.2f} ms of {guided.step_ms:.1f} ms "
          f"({overhead / guided.step_ms:.1%}): fill {guided.fill_ms:.2f}, apply {guided.apply_ms:.2f}, "
          f"advance {guided.advance_ms:.2f}; the ratio it alone implies: "
          f"{unguided.step_ms / (unguided.step_ms + overhead):.3f} (timings on a shared CPU are noisy)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each mode (alternating)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 prompts, 24 tokens, 1 repeat")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if a.quick:
        a.num_prompts, a.max_tokens, a.repeats = 4, 24, 1
    return a


def main() -> None:
    a = parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    llm = LLM(a.model, device=a.device, max_model_len=512, max_num_seqs=max(a.num_prompts, 1), block_size=16,
              num_gpu_blocks_override=a.num_prompts * (512 // 16) + 1, enable_prefix_caching=False)
    timers = Timers()
    instrument(llm, timers)
    prompts = make_prompts(llm, a.num_prompts)
    lengths = [len(p["prompt_token_ids"]) for p in prompts]
    print(f"model {a.model} on {llm.engine.core.device} ({str(llm.engine.core.dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads); {a.num_prompts} prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"{a.max_tokens} output tokens each, greedy")

    structured = llm.engine.core.structured
    began = time.perf_counter()
    decoder = structured.decoder  # the tokenizer info, built on first use
    decoder_s = time.perf_counter() - began
    began = time.perf_counter()
    decoder.compiled_grammar(StructuredOutputsParams(json=SCHEMA))  # what the first guided request waits for
    compile_s = time.perf_counter() - began
    print(f"one-time costs: guided decoder (xgrammar TokenizerInfo) {decoder_s:.2f} s, "
          f"schema compile {compile_s:.2f} s (then cached)")

    for mode in ("unguided", "guided"):  # warm-up: allocator, kernels, matcher caches
        run(llm, timers, prompts[:2], mode, 8)
    results: dict[str, list[Result]] = defaultdict(list)
    sample = None
    for _ in range(a.repeats):
        for mode in ("unguided", "guided"):
            result, outputs = run(llm, timers, prompts, mode, a.max_tokens)
            results[mode].append(result)
            if mode == "guided":
                sample = outputs[0].outputs[0].text
            print(f"  {mode:<9} {result.wall_s:6.2f} s  {result.output_tok_s:6.1f} tok/s", flush=True)
    best = {mode: max(rs, key=lambda r: r.output_tok_s) for mode, rs in results.items()}
    if best["guided"].output_tokens != best["unguided"].output_tokens:
        print(f"WARNING: the runs produced different token counts ({best['guided'].output_tokens} guided, "
              f"{best['unguided'].output_tokens} unguided): {best['guided'].finished_by_grammar} guided requests "
              f"completed their schema before max_tokens")
    print_table(best, results)
    print(f"first guided output (truncated at {a.max_tokens} tokens): {sample[:160]!r}")
    if a.json:
        settings = {k: v for k, v in vars(a).items() if k not in ("json", "quick")}
        with open(a.json, "w") as f:
            json.dump({**settings, "device": str(llm.engine.core.device), "num_threads": torch.get_num_threads(),
                       "decoder_init_s": decoder_s, "schema_compile_s": compile_s,
                       "best": {m: asdict(r) for m, r in best.items()},
                       "runs": {m: [asdict(r) for r in rs] for m, rs in results.items()},
                       "ratio_output_tok_s": best["guided"].output_tok_s / best["unguided"].output_tok_s,
                       "wall_s_median": {m: statistics.median(r.wall_s for r in rs) for m, rs in results.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
