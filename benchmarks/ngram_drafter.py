"""Time ``NgramDrafter.propose`` for one engine step: a batch of 64 requests.

    .venv/bin/python benchmarks/ngram_drafter.py

Sequences are random tokens with copied spans (so suffixes recur, as in code or
quoted text). The brute-force scan of the definition is timed side by side on
the smallest length only; per DESIGN.md read the ratio, not the absolute time.
"""
import random
import time

import numpy as np

import tokenmill
from tokenmill.plugins.spec_decode import NgramDrafter

BATCH = 64
LENGTHS = (1_024, 8_192, 32_768)
VOCAB = 2_000
K, LOOKUP_MIN, LOOKUP_MAX = 4, 2, 5


def make_sequence(rng: random.Random, length: int) -> np.ndarray:
    tokens: list[int] = []
    while len(tokens) < length:
        if tokens and rng.random() < 0.3:
            start = rng.randrange(len(tokens))
            tokens += tokens[start:start + rng.randrange(4, 64)]
        else:
            tokens += [rng.randrange(VOCAB) for _ in range(rng.randrange(4, 64))]
    return np.asarray(tokens[:length], dtype=np.int64)


def brute_force_propose(token_ids, max_num_tokens):
    drafts = []
    for tokens, limit in zip(token_ids, max_num_tokens):
        tokens, limit, draft = list(tokens), min(K, limit), []
        for n in range(LOOKUP_MAX, LOOKUP_MIN - 1, -1):
            suffix = tokens[-n:]
            start = next((s for s in range(len(tokens) - n) if tokens[s:s + n] == suffix), None)
            if start is not None:
                draft = tokens[start + n:start + n + limit]
                break
        drafts.append(draft)
    return drafts


def ms_per_step(propose, token_ids, limits, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        propose(token_ids, limits)
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    rng = random.Random(0)
    config = tokenmill.SpeculativeConfig(method="ngram", num_speculative_tokens=K,
                                         prompt_lookup_min=LOOKUP_MIN, prompt_lookup_max=LOOKUP_MAX)
    drafter = NgramDrafter(config)
    limits = [K] * BATCH
    print(f"batch {BATCH}, k {K}, prompt_lookup {LOOKUP_MIN}..{LOOKUP_MAX}, vocab {VOCAB}; best of repeats")
    for length in LENGTHS:
        token_ids = [make_sequence(rng, length) for _ in range(BATCH)]
        ngram_ms = ms_per_step(drafter.propose, token_ids, limits, repeats=20)
        line = f"len {length:>6}: ngram {ngram_ms:8.2f} ms/step"
        if length == LENGTHS[0]:
            as_lists = [t.tolist() for t in token_ids]
            assert drafter.propose(token_ids, limits) == brute_force_propose(as_lists, limits)
            brute_ms = ms_per_step(brute_force_propose, as_lists, limits, repeats=3)
            line += f"   brute force {brute_ms:8.2f} ms/step   ratio {brute_ms / ngram_ms:6.1f}x"
        num_drafted = sum(map(len, drafter.propose(token_ids, limits)))
        print(f"{line}   ({num_drafted} draft tokens)")


if __name__ == "__main__":
    main()
