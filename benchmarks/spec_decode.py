"""Speculative decoding with the ``ngram`` drafter: tokens/s with and without drafts, one run.

    .venv/bin/python benchmarks/spec_decode.py                          # batch 1 and 8, 128 new tokens
    .venv/bin/python benchmarks/spec_decode.py --max-tokens 64 --batch-sizes 1 --profile

Two workloads of 8 chat prompts each (the model's chat template), greedy, EOS ends a request:

- ``grounded``: the answer copies the prompt (repeat a paragraph with its typos fixed,
  summarise with quotes, fix a function): prompt lookup finds most of it;
- ``open``: free writing (short stories, explanations): little to look up.

Each (workload, batch size) runs on two engines built alike, one without drafts and one with
``speculative_config={"method": "ngram", ...}``: batch B hands B prompts to one ``generate``
call (batch 1: one prompt at a time), each batch without then with drafts right after, so both
see the same machine; ``--repeats`` times, each batch's best time counting. The table gives
output tokens/s, the ratio, the acceptance rate and mean accepted length (tokens per
verifying step) from the engine's stats, and whether every output is token-identical
without and with drafts (greedy must be).
``--profile`` adds where the time of an engine step goes (model forward, logits, sampler or
rejection sampler, drafter, the rest), per engine, from timers wrapped around the
components of the run (nothing in the engine changes).
Prefix caching is off so that repeats cost the same. Per DESIGN.md read the ratio column,
not the absolute numbers; on a shared machine use --threads 1 (the default here: a
two-thread matmul waits for a busy core).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from tokenmill.config import DEFAULT_MODEL
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

PARAGRAPHS = [
    "The city libary opened it's new reading room on Monday. The room has tall windows, long oak tables and "
    "enough seats for sixty people. Visitors can borrow laptops at the front desk, and the staff will help "
    "anyone who want to learn how to search the online catalogue. The room is open every day from nine in "
    "the morning until eight in the evening, exept on public holidays.",
    "To make a simple tomato soup, chop one onion and two cloves of garlic and cook them slowly in olive oil "
    "untill they are soft. Add a kilo of ripe tomatos, a pinch of salt and half a litre of water, then let "
    "the pot simmer for twenty minutes. Blend the soup until it is smooth, taste it, and add a little sugar "
    "if the tomatoes are to sour. Serve it hot with fresh bread.",
    "Our team meeting will take place on Thursday at ten o'clock in room 4B. Please bring your notes from "
    "last weeks workshop and a short list of the tasks you have finished. We will discus the new schedule, "
    "the budget for the spring project and the plans for the summer break. If you can not attend, send "
    "your update to Maria before Wednesday evening.",
    "Honey bees live in colonies of up to sixty thousand insects. Each colony has one queen, who lays all "
    "of the eggs, a few hundred male drones and thousands of female workers. The workers clean the hive, "
    "feed the larvae, guard the entrance and fly out to collect nectar and pollen from flowers. A healthy "
    "colony can produce more then twenty kilograms of honey in a good year.",
]
BUGGY_CODE = '''def average(numbers):
    """Return the mean of a list of numbers, or 0.0 for an empty list."""
    total = 0
    for n in numbers:
        total += n
    if len(numbers) == 0:
        return 0.0
    return total / len(numbers) + 1'''

GROUNDED = [
    *[f"Repeat the following text with the typos fixed. Change nothing else.\n\n{p}" for p in PARAGRAPHS],
    f"Summarise the following text in three sentences, quoting its key phrases word for word.\n\n{PARAGRAPHS[0]}",
    f"Summarise with quotes: list the three most important sentences of this text, copied exactly.\n\n"
    f"{PARAGRAPHS[3]}",
    f"Fix the bug in this Python function and return the whole corrected function.\n\n```python\n{BUGGY_CODE}\n```",
    f"Rewrite the following text as a bulleted list, one sentence per bullet, keeping the wording.\n\n"
    f"{PARAGRAPHS[2]}",
]
OPEN = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a short story about a robot who wants to learn how to paint.",
    "Write a short story about a cat who dreams of becoming a detective.",
    "Explain to a ten-year-old why the sky is blue.",
    "Give me five tips for preparing for a job interview.",
    "Write a poem about autumn in a small mountain town.",
    "Describe how a bicycle works.",
    "What are the benefits of learning a second language?",
]
WORKLOADS = {"grounded": GROUNDED, "open": OPEN}


@dataclass(slots=True)
class Row:
    workload: str
    batch_size: int
    output_tokens: int
    plain_s: float
    spec_s: float
    plain_tok_s: float
    spec_tok_s: float
    speedup: float
    acceptance_rate: float
    mean_accepted_length: float
    draft_tokens: int
    accepted_tokens: int
    identical: bool
    num_identical: int
    num_requests: int


@dataclass
class StepProfile:
    """Seconds spent per component, summed over engine steps."""
    steps: int = 0
    tokens: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    forward_by_tokens: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))


# ---------------------------------------------------------------- running

def spec_stats(llm: LLM) -> tuple[int, int, int]:
    stats = llm.get_stats()
    return stats["spec_num_draft_tokens"], stats["spec_num_accepted_tokens"], stats["spec_num_verify_steps"]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """(wall seconds, output token ids) of one generate call."""
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - began, [list(o.outputs[0].token_ids) for o in outputs]


def measure(plain: LLM, spec: LLM, workload: str, prompts: list[list[int]], params: SamplingParams,
            batch_size: int, repeats: int) -> Row:
    """Batches of ``batch_size`` prompts, each run without then with drafts right after (so both
    see the same machine), ``repeats`` times; each batch's best time counts."""
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    plain_best = [float("inf")] * len(batches)
    spec_best = [float("inf")] * len(batches)
    before = spec_stats(spec)
    identical: list[bool] = []
    num_out = 0
    for repeat in range(repeats):
        for i, batch in enumerate(batches):
            wall, plain_tokens = run(plain, batch, params)
            plain_best[i] = min(plain_best[i], wall)
            wall, spec_tokens = run(spec, batch, params)
            spec_best[i] = min(spec_best[i], wall)
            if repeat == 0:
                identical += [a == b for a, b in zip(plain_tokens, spec_tokens)]
                num_out += sum(map(len, plain_tokens))
    drafted, accepted, verify_steps = (a - b for a, b in zip(spec_stats(spec), before))
    plain_s, spec_s = sum(plain_best), sum(spec_best)
    return Row(workload, batch_size, num_out, plain_s, spec_s, num_out / plain_s, num_out / spec_s,
               plain_s / spec_s, accepted / drafted if drafted else 0.0,
               (accepted + verify_steps) / verify_steps if verify_steps else 0.0, drafted // repeats,
               accepted // repeats, all(identical), sum(identical), len(identical))


# ---------------------------------------------------------------- profiling

def _timed(profile: StepProfile, name: str, fn, on_call=None):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        result = fn(*args, **kwargs)
        elapsed = time.perf_counter() - began
        profile.seconds[name] += elapsed
        if on_call is not None:
            on_call(elapsed, *args)
        return result
    return wrapper


def instrument(llm: LLM) -> StepProfile:
    """Timers around this engine's components (instance attributes: the classes are untouched)."""
    profile = StepProfile()
    core = llm.engine.core
    runner = core.runner

    def count_step(elapsed, *args):
        profile.steps += 1

    def count_forward(elapsed, input_ids, *args):
        profile.tokens += int(input_ids.shape[0])
        profile.forward_by_tokens[int(input_ids.shape[0])].append(elapsed)

    core.step = _timed(profile, "step", core.step, count_step)
    runner.model.forward = _timed(profile, "model forward", runner.model.forward, count_forward)
    runner.model.compute_logits = _timed(profile, "compute_logits", runner.model.compute_logits)
    runner.sampler.forward = _timed(profile, "sampler", runner.sampler.forward)
    runner.rejection_sampler.forward = _timed(profile, "rejection sampler", runner.rejection_sampler.forward)
    if runner.drafter is not None:
        runner.drafter.propose = _timed(profile, "drafter", runner.drafter.propose)
    runner._sampling_metadata = _timed(profile, "sampling metadata", runner._sampling_metadata)
    return profile


def profile_summary(profile: StepProfile) -> dict[str, float]:
    """ms per step of each timed component, for --json."""
    steps = max(profile.steps, 1)
    return {"steps": profile.steps, "forward_tokens_per_step": profile.tokens / steps,
            **{f"{part}_ms_per_step": seconds / steps * 1e3 for part, seconds in profile.seconds.items()}}


def print_profile(name: str, profile: StepProfile) -> None:
    steps = max(profile.steps, 1)
    total = profile.seconds["step"]
    print(f"  {name}: {profile.steps} steps, {total / steps * 1e3:.1f} ms/step, "
          f"{profile.tokens / steps:.1f} forward tokens/step")
    parts = ["model forward", "compute_logits", "sampler", "rejection sampler", "sampling metadata", "drafter"]
    accounted = 0.0
    for part in parts:
        if part in profile.seconds:
            seconds = profile.seconds[part]
            accounted += seconds
            print(f"    {part:<20}{seconds / steps * 1e3:>8.2f} ms/step {seconds / total:>7.1%}")
    print(f"    {'rest (sched, I/O)':<20}{(total - accounted) / steps * 1e3:>8.2f} ms/step "
          f"{(total - accounted) / total:>7.1%}")


def print_forward_costs(profiles: dict[str, StepProfile]) -> None:
    """Mean model-forward time by number of tokens in the step (decode steps: few tokens)."""
    merged: dict[int, list[float]] = defaultdict(list)
    for profile in profiles.values():
        for n, times in profile.forward_by_tokens.items():
            merged[n].extend(times)
    small = sorted(n for n in merged if n <= 64)
    if not small:
        return
    base = sum(merged[small[0]]) / len(merged[small[0]])
    print("  model forward by tokens in the step (decode sizes):")
    for n in small:
        mean = sum(merged[n]) / len(merged[n])
        print(f"    {n:>3} tokens: {mean * 1e3:7.2f} ms ({mean / base:4.2f}x the {small[0]}-token step, "
              f"{len(merged[n])} steps)")


# ---------------------------------------------------------------- report

def print_table(rows: list[Row]) -> None:
    print(f"{'workload':<10}{'batch':>6}{'out tok':>9}{'plain tok/s':>13}{'ngram tok/s':>13}{'ratio':>8}"
          f"{'accept':>8}{'mean len':>10}  identical")
    for r in rows:
        print(f"{r.workload:<10}{r.batch_size:>6}{r.output_tokens:>9}{r.plain_tok_s:>13.1f}{r.spec_tok_s:>13.1f}"
              f"{r.speedup:>7.2f}x{r.acceptance_rate:>8.1%}{r.mean_accepted_length:>10.2f}  "
              f"{'yes' if r.identical else 'NO'} ({r.num_identical}/{r.num_requests})")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    ap.add_argument("--workloads", default="grounded,open", help=f"comma-separated, from {list(WORKLOADS)}")
    ap.add_argument("--num-speculative-tokens", "-k", type=int, default=4)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="runs per batch and engine; the best counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="also print where an engine step's time goes")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    a.workloads = [w.strip() for w in a.workloads.split(",")]
    unknown = set(a.workloads) - WORKLOADS.keys()
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    return a


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    speculative = {"method": "ngram", "num_speculative_tokens": a.num_speculative_tokens,
                   "prompt_lookup_min": a.prompt_lookup_min, "prompt_lookup_max": a.prompt_lookup_max}
    options = dict(device=a.device, max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                   enable_prefix_caching=False)
    plain = LLM(a.model, **options)
    spec = LLM(a.model, **options, speculative_config=speculative)
    core = plain.engine.core
    device, dtype = str(core.device), str(core.dtype).removeprefix("torch.")
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    prompts = {name: [plain.apply_chat_template([{"role": "user", "content": text}]) for text in WORKLOADS[name]]
               for name in a.workloads}
    print(f"model {a.model} on {device} ({dtype}, {torch.get_num_threads()} threads); greedy, max_tokens "
          f"{a.max_tokens}; ngram k={a.num_speculative_tokens}, lookup {a.prompt_lookup_min}-"
          f"{a.prompt_lookup_max}; prompts: " + ", ".join(f"{n} {len(p)} ({min(map(len, p))}-{max(map(len, p))} "
                                                           f"tokens)" for n, p in prompts.items()), flush=True)

    warm = [prompts[a.workloads[0]][0]]  # first-call costs off the clock
    for llm in (plain, spec):
        run(llm, warm, SamplingParams(temperature=0.0, max_tokens=8))
    profiles = {"plain": instrument(plain), "ngram": instrument(spec)} if a.profile else {}

    rows = []
    summaries = []
    for name in a.workloads:
        for batch_size in a.batch_sizes:
            if a.profile:
                for profile in profiles.values():
                    profile.__init__()
            row = measure(plain, spec, name, prompts[name], params, batch_size, a.repeats)
            rows.append(row)
            print(f"{name} batch {batch_size}: plain {row.plain_s:.1f} s, ngram {row.spec_s:.1f} s", flush=True)
            if a.profile:
                for engine, profile in profiles.items():
                    print_profile(engine, profile)
                print_forward_costs(profiles)
                summaries.append({"workload": name, "batch_size": batch_size,
                                  **{engine: profile_summary(p) for engine, p in profiles.items()}})
    print()
    print_table(rows)
    print("ratio: ngram tok/s over plain tok/s (same outputs, so the wall-time ratio); accept: accepted / "
          "drafted tokens; mean len: tokens emitted per verifying step (accepted + 1)")
    if a.json:
        settings = {k: v for k, v in vars(a).items() if k != "json"}
        with open(a.json, "w") as f:
            json.dump({**settings, "device": device, "dtype": dtype, "num_threads": torch.get_num_threads(),
                       "results": [asdict(r) for r in rows], "profiles": summaries}, f, indent=2)


if __name__ == "__main__":
    main()
