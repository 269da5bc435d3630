"""The engine against transformers: greedy token ids identical, logprobs close.

Tiny random checkpoints of each supported family (GQA and MHA, tied and untied
embeddings, an odd head count) are decoded through ``LLM.generate`` with
prompts of different lengths in one call and a small token budget, so steps
mix decodes with prompt chunks; the real default model (the packaged GGUF) is
compared on eight prompts, one of them longer than 300 tokens.
"""
import pytest
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from builders import (TINY_CONFIGS, assert_no_leaks, hf_greedy, hf_logprobs, make_checkpoint, make_llm,
                      output_ids, random_prompts, token_prompts)
from tokenmill import loader
from tokenmill.config import DEFAULT_MODEL
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

PROMPT_LENGTHS = [1, 3, 17, 40, 100]  # one token, less than a block, several blocks
MAX_TOKENS = 24


# ---------------------------------------------------------------- tiny random checkpoints

@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_matches_transformers_generate(tmp_path, name):
    hf_model = make_checkpoint(tmp_path, TINY_CONFIGS[name])
    prompts = random_prompts(PROMPT_LENGTHS)
    expected = [hf_greedy(hf_model, prompt, MAX_TOKENS) for prompt in prompts]
    assert all(len(set(ids)) > 1 for ids in expected)  # the weights do not collapse greedy onto one token

    # 64 tokens a step: the 100-token prompt is computed in chunks while the short ones decode
    llm = make_llm(tmp_path, max_num_batched_tokens=64)
    outputs = llm.generate(token_prompts(prompts), SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                  ignore_eos=True), use_tqdm=False)

    assert output_ids(outputs) == expected
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * len(prompts)
    assert_no_leaks(llm)


# ---------------------------------------------------------------- the default model

QUESTION = "What is the capital of France?"
FOX = "The quick brown fox jumps over the lazy dog. "
DEFAULT_PROMPTS = [
    "Hello",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time,",
    FOX * 40,  # about 400 tokens: several chunks of 128
    "In 1492, Columbus " + FOX * 8,
    "def fibonacci(n):",
    "Explain photosynthesis in one sentence. " * 12,
]
DEFAULT_MAX_TOKENS = 8
NUM_LOGPROBS = 5


@pytest.fixture(scope="module")
def default_llm():
    """The GGUF expanded to fp32, as transformers reads it (the quantized path: test_quantized_model.py)."""
    return LLM(max_model_len=1024, device="cpu", dtype="float32", max_num_batched_tokens=128,
               num_gpu_blocks_override=160, quantization="none")


@pytest.fixture(scope="module")
def default_hf_model():
    """transformers' LlamaForCausalLM with the GGUF's weights, read by transformers' own GGUF reader."""
    source = loader.resolve_model_source(DEFAULT_MODEL, "auto")
    hf_model = transformers.LlamaForCausalLM(loader.load_hf_config(source)).float().eval()
    tensors = load_gguf_checkpoint(str(source.gguf_path), return_tensors=True, model_to_load=hf_model)["tensors"]
    missing, unexpected = hf_model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to embed_tokens
    hf_model.tie_weights()
    return hf_model


@pytest.fixture(scope="module")
def default_run(default_llm):
    """(prompt token ids, RequestOutputs) of one greedy generate call over DEFAULT_PROMPTS."""
    tokenizer = default_llm.get_tokenizer()
    prompts = [tokenizer.encode(text) for text in DEFAULT_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=DEFAULT_MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    return prompts, default_llm.generate(token_prompts(prompts), params, use_tqdm=False)


def test_default_prompts_include_one_longer_than_300_tokens(default_run):
    prompts, _ = default_run
    assert max(len(p) for p in prompts) > 300 and min(len(p) for p in prompts) == 1


@pytest.fixture(scope="module")
def default_reference(default_run, default_hf_model):
    """Per prompt, transformers' logprobs [DEFAULT_MAX_TOKENS, vocab] at the generated positions:
    row i is the distribution of generated token i given the prompt and the tokens before it."""
    prompts, outputs = default_run
    return [hf_logprobs(default_hf_model, prompt + output.outputs[0].token_ids, DEFAULT_MAX_TOKENS + 1)[:-1]
            for prompt, output in zip(prompts, outputs)]


def test_default_model_greedy_matches_transformers(default_run, default_reference, default_llm):
    """Teacher-forced: each generated token is transformers' argmax after the prompt and the
    tokens before it, which is exactly what transformers' greedy ``generate`` produces."""
    _, outputs = default_run
    for output, reference in zip(outputs, default_reference):
        assert output.outputs[0].token_ids == reference.argmax(dim=-1).tolist()
    assert_no_leaks(default_llm)


def test_default_model_logprobs_match_transformers(default_run, default_reference):
    _, outputs = default_run
    for output, reference in zip(outputs, default_reference):
        completion = output.outputs[0]
        assert len(completion.logprobs) == DEFAULT_MAX_TOKENS
        for position, (entry, token_id, ref) in enumerate(zip(completion.logprobs, completion.token_ids, reference)):
            assert set(entry) == set(ref.topk(NUM_LOGPROBS).indices.tolist()), position  # greedy: chosen is in
            assert entry[token_id].rank == 1
            for candidate, logprob in entry.items():
                assert logprob.logprob == pytest.approx(ref[candidate].item(), abs=1e-3), (position, candidate)


def test_default_model_answers_the_capital_of_france(default_llm):
    outputs = default_llm.chat([{"role": "user", "content": QUESTION}],
                               SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    completion = outputs[0].outputs[0]
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop" and completion.stop_reason is None  # EOS
    assert completion.token_ids[-1] == default_llm.get_tokenizer().eos_token_id
    assert_no_leaks(default_llm)


def test_default_model_stop_string_cuts_the_answer(default_llm):
    params = SamplingParams(temperature=0.0, max_tokens=32, stop=[" Paris"])
    completion = default_llm.chat([{"role": "user", "content": QUESTION}], params, use_tqdm=False)[0].outputs[0]
    assert completion.text == "The capital of France is"
    assert (completion.finish_reason, completion.stop_reason) == ("stop", " Paris")
    assert_no_leaks(default_llm)


def test_default_model_stream_adds_up_to_the_answer(default_llm):
    prompt = {"prompt_token_ids": default_llm.apply_chat_template([{"role": "user", "content": QUESTION}])}
    deltas = list(default_llm.stream(prompt, SamplingParams(temperature=0.0, max_tokens=32)))
    assert "".join(d.outputs[0].text for d in deltas) == "The capital of France is Paris."
    assert len(deltas) == 8 and deltas[-1].finished  # one delta per token, the last one EOS
    assert_no_leaks(default_llm)
