"""Shared data and fixtures of the engine feature tests: a tiny random Llama checkpoint,
prompts that share a prefix, and their greedy tokens from a plain engine.

Test modules import the fixtures by name; module scope makes one checkpoint per module.
"""
import pytest

from builders import TINY_CONFIGS, make_checkpoint, make_llm, output_ids, random_prompts, token_prompts
from tokenmill.sampling_params import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
SHARED_PREFIX = random_prompts([40], seed=1)[0]  # two and a half blocks of 16
PROMPTS = [SHARED_PREFIX + tail for tail in random_prompts([1, 9, 30, 70], seed=2)] + random_prompts([5, 23], seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint directory, its transformers model)."""
    path = tmp_path_factory.mktemp("llama")
    return path, make_checkpoint(path, TINY_CONFIGS["llama-gqa-untied"])


@pytest.fixture(scope="module")
def llm(checkpoint):
    """A plain engine shared by the tests that do not change engine options."""
    return make_llm(checkpoint[0])


@pytest.fixture(scope="module")
def plain_ids(checkpoint):
    """Greedy token ids of PROMPTS from the plain engine (prefix caching off)."""
    plain = make_llm(checkpoint[0], enable_prefix_caching=False)
    return output_ids(plain.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False))


def generate(llm, prompts, params):
    return llm.generate(token_prompts(prompts), params, use_tqdm=False)
