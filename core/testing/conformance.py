"""Conformance checks: each component kind against its contract.

Every check is a plain function ``check(cls)`` that raises ``AssertionError``
(or ``pytest.skip`` for a missing precondition such as a CUDA device). The
pytest plugin in ``tokenmill.testing`` turns them into test items.
"""
from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable

import pytest
import torch
from pydantic import BaseModel

from ..components import ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, MODEL, REASONING_PARSER, TOOL_PARSER
from ..distributed import TensorParallel, get_tensor_parallel
from ..errors import ConfigError
from .builders import make_attention_metadata, shuffled_block_tables
from .tensor_parallel import start_ranks

# (dtype, absolute tolerance, relative tolerance) for attention outputs against the fp32 reference
ATTENTION_TOLERANCES = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.5e-2, 2e-2)}


def _device_for(cls) -> str:
    if "cpu" in cls.supported_devices:
        return "cpu"
    if "cuda" in cls.supported_devices and torch.cuda.is_available():
        return "cuda"
    pytest.skip(f"{cls.name} supports {list(cls.supported_devices)}; none of them is present here")


# ---------------------------------------------------------------- attention backends


def attention_matches_reference(cls) -> None:
    """Prefill from empty, then a mixed step (decode, chunk after a cached prefix
    not aligned to a block, fresh prompt), both equal to the reference: plain
    per-request attention in fp32 (``reference_paged_attention``), independent of
    every backend's fast path, the built-in ``torch`` backend's included."""

    device = _device_for(cls)
    head_size = 32 if cls.supported_head_sizes is None else min(cls.supported_head_sizes)
    block_size = 16 if cls.supported_block_sizes is None else min(cls.supported_block_sizes)
    for dtype in [d for d in (torch.float32, torch.bfloat16) if d in cls.supported_dtypes]:
        for num_heads, num_kv_heads in ((4, 4), (6, 2)):
            _compare_two_steps(cls, device, dtype, num_heads, num_kv_heads, head_size, block_size)


def attention_honours_window_and_soft_cap(cls) -> None:
    """The same two steps with a sliding window shorter than most contexts (its edge inside a
    block, a prompt chunk crossing it, a cached prefix longer than it), with a logits soft cap,
    and with both, each equal to the reference: the variants the backend declares
    (``supports_sliding_window``, ``supports_logits_soft_cap``). A backend that declares neither
    is never given a model that uses them, so there is nothing to check."""
    variants = [(window, cap) for window, cap in ((6, None), (None, 1.5), (11, 1.5))
                if (window is None or cls.supports_sliding_window) and (cap is None or cls.supports_logits_soft_cap)]
    if not variants:
        pytest.skip(f"{cls.__qualname__} declares neither supports_sliding_window nor supports_logits_soft_cap: "
                    "models that use them do not run on it")
    device = _device_for(cls)
    head_size = 32 if cls.supported_head_sizes is None else min(cls.supported_head_sizes)
    block_size = 16 if cls.supported_block_sizes is None else min(cls.supported_block_sizes)
    dtype = torch.float32 if torch.float32 in cls.supported_dtypes else cls.supported_dtypes[0]
    for window, soft_cap in variants:
        _compare_two_steps(cls, device, dtype, 6, 2, head_size, block_size, sliding_window=window,
                           logits_soft_cap=soft_cap)


def _compare_two_steps(cls, device, dtype, num_heads, num_kv_heads, head_size, block_size, **variant) -> None:
    """``variant``: the ``sliding_window`` and ``logits_soft_cap`` keywords, when given."""
    from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend, reference_paged_attention

    gen = torch.Generator().manual_seed(0)
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype, device=device)
    backend, ref_cls = cls(**kwargs), TorchAttentionBackend
    num_blocks = 24
    cache = torch.zeros(cls.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device)
    ref_cache = torch.zeros(ref_cls.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size),
                            dtype=dtype, device=device)
    prefix_lens, new_lens = [17, 7, 0, 33], [1, 5, 9, 2]
    tables = shuffled_block_tables([p + n for p, n in zip(prefix_lens, new_lens)], block_size, num_blocks, gen)
    atol, rtol = ATTENTION_TOLERANCES[dtype]
    scale = head_size ** -0.5
    steps = [(prefix_lens, prefix_lens, 0), (new_lens, [p + n for p, n in zip(prefix_lens, new_lens)], 3)]
    for step, (query_lens, seq_lens, padding) in enumerate(steps):
        md = make_attention_metadata(query_lens, seq_lens, tables, block_size, device, num_padding_tokens=padding)
        total = md.num_actual_tokens + padding
        q, k, v = (torch.randn(total, h, head_size, generator=gen).to(device, dtype)
                   for h in (num_heads, num_kv_heads, num_kv_heads))
        if variant.get("logits_soft_cap"):  # scores of a few units: the cap bends them
            q = q * 3
        out = backend.forward(q, k, v, cache, md, scale, **variant)
        expected = reference_paged_attention(q, k, v, ref_cache, md, scale, **variant)
        assert out.shape == q.shape and out.dtype == q.dtype, \
            f"{cls.name}: output {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}"
        n = md.num_actual_tokens
        torch.testing.assert_close(out[:n].float(), expected[:n].float(), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{cls.name} step {step} ({dtype}, heads {num_heads}/"
                                                 f"{num_kv_heads}{_describe(variant)}) differs from the reference: {m}")


def _describe(variant: dict) -> str:
    return "".join(f", {name}={value}" for name, value in variant.items() if value is not None)


def attention_declares_cache_shape(cls) -> None:
    shape = cls.kv_cache_shape(8, 16, 2, 64)
    assert isinstance(shape, tuple) and all(isinstance(d, int) and d > 0 for d in shape), \
        f"{cls.name}.kv_cache_shape must return a tuple of positive ints, got {shape!r}"
    numel = 1
    for d in shape:
        numel *= d
    assert numel >= 2 * 8 * 16 * 2 * 64, f"{cls.name}.kv_cache_shape {shape} cannot hold keys and values"


# ---------------------------------------------------------------- drafters


def _drafter(cls, k: int = 3):
    return cls(num_speculative_tokens=k)


def _random_requests(seed: int, count: int = 24) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    token_ids = [[rng.randrange(6) for _ in range(rng.randrange(0, 40))] for _ in range(count)]
    return token_ids, [rng.randrange(0, 6) for _ in range(count)]


def drafter_respects_bounds(cls) -> None:
    drafter = _drafter(cls)
    for seed in range(5):
        token_ids, limits = _random_requests(seed)
        drafts = drafter.propose(token_ids, limits)
        assert len(drafts) == len(token_ids), f"{cls.name}: {len(drafts)} results for {len(token_ids)} requests"
        for tokens, limit, draft in zip(token_ids, limits, drafts):
            draft = list(draft)
            assert len(draft) <= limit, f"{cls.name} proposed {len(draft)} tokens, limit {limit}: {draft}"
            assert all(int(t) == t and t >= 0 for t in draft), f"{cls.name} proposed non-token values {draft}"


def drafter_is_deterministic(cls) -> None:
    """The rejection rule treats drafts as a point mass: same input, same drafts."""
    token_ids, limits = _random_requests(7)
    first = [list(map(int, d)) for d in _drafter(cls).propose(token_ids, limits)]
    again = [list(map(int, d)) for d in _drafter(cls).propose(token_ids, limits)]
    assert first == again, f"{cls.name} is not deterministic"


def drafter_accepts_numpy(cls) -> None:
    import numpy as np

    token_ids, limits = _random_requests(3)
    as_lists = [list(map(int, d)) for d in _drafter(cls).propose(token_ids, limits)]
    as_arrays = [list(map(int, d)) for d in _drafter(cls).propose(
        [np.asarray(t, dtype=np.int64) for t in token_ids], limits)]
    assert as_lists == as_arrays, f"{cls.name} gives different drafts for numpy input"
    assert list(_drafter(cls).propose([], [])) == [], f"{cls.name} must return [] for an empty batch"


# ---------------------------------------------------------------- guided decoders


def _guided(cls, padding: int = 7):
    from .builders import make_byte_level_tokenizer

    tokenizer = make_byte_level_tokenizer()
    # the model's vocabulary is often wider than the tokenizer's: padding ids must never be allowed
    return cls(tokenizer, len(tokenizer) + padding), tokenizer


def _allowed(grammar, vocab_size: int) -> set[int]:
    from ..structured import allocate_token_bitmask, bitmask_to_bool

    bitmask = allocate_token_bitmask(2, vocab_size)
    grammar.fill_bitmask(bitmask, 1)
    assert bitmask_to_bool(bitmask[:1], vocab_size).all(), "fill_bitmask wrote outside its row"
    return set(bitmask_to_bool(bitmask[1:], vocab_size)[0].nonzero().flatten().tolist())


def guided_choice_contract(cls) -> None:
    """Bitmask, accept, reject, rollback and termination on a choice spec."""
    from ..structured import StructuredOutputsParams

    decoder, tokenizer = _guided(cls)
    vocab = decoder.vocab_size
    grammar = decoder.compile(StructuredOutputsParams(choice=["yes", "no"]))
    start = _allowed(grammar, vocab)
    yes, no = tokenizer.encode("yes"), tokenizer.encode("no")
    assert {yes[0], no[0]} <= start, f"{cls.name}: first tokens of the choices are not allowed: {sorted(start)}"
    assert all(t < len(tokenizer) for t in start), f"{cls.name} allows padding ids past the tokenizer"
    assert tokenizer.encode("x")[0] not in start, f"{cls.name} allows a token no choice starts with"
    assert not grammar.accept_tokens(tokenizer.encode("x")), f"{cls.name} accepted a forbidden token"
    assert _allowed(grammar, vocab) == start, f"{cls.name}: a rejected token changed the state"
    assert grammar.accept_tokens(yes), f"{cls.name} rejected the tokens of a choice"
    assert not grammar.is_terminated() or tokenizer.eos_token_id is None
    grammar.rollback(len(yes))
    assert _allowed(grammar, vocab) == start, f"{cls.name}: rollback did not restore the start state"
    assert grammar.accept_tokens(no) and grammar.accept_tokens([tokenizer.eos_token_id]), \
        f"{cls.name}: a complete choice followed by EOS was not accepted"
    assert grammar.is_terminated(), f"{cls.name}: not terminated after a complete choice and EOS"


def guided_rejects_what_it_cannot_honour(cls) -> None:
    from ..structured import StructuredOutputsParams, UnsupportedStructuredOutput

    decoder, _ = _guided(cls)
    for spec in (dict(regex="(unclosed"), dict(json="{not json"), dict(grammar="root ::= (")):
        try:
            decoder.compile(StructuredOutputsParams(**spec))
        except UnsupportedStructuredOutput:
            continue
        raise AssertionError(f"{cls.name} compiled the invalid spec {spec} instead of raising "
                             "UnsupportedStructuredOutput")


# ---------------------------------------------------------------- models


def _tiny_model(cls, hf_config):
    """An fp32 CPU instance on the torch backend, with 16 cache blocks of 16; under tensor parallelism this
    rank's shard, its backend and caches built with the rank's heads (``TensorParallel.local_heads``)."""
    from tokenmill.plugins.attention.torch_backend import TorchAttentionBackend

    spec = cls.kv_cache_spec(hf_config)
    num_heads, num_kv_heads = get_tensor_parallel().local_heads(hf_config.num_attention_heads, spec.num_kv_heads)
    attention = TorchAttentionBackend(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      head_size=spec.head_size, dtype=torch.float32, device="cpu")
    model = cls(hf_config, attention).float().eval()
    caches = [torch.zeros(attention.kv_cache_shape(16, 16, num_kv_heads, spec.head_size))
              for _ in range(spec.num_layers)]
    model.bind_kv_caches(caches)
    return model, caches


def _hf_twin(cls, purpose: str = "compare against"):
    """The class's ``example_config()`` and a transformers model of it with weights N(0, 0.05), seed 0;
    skips when transformers has no such class."""
    import transformers

    hf_config = cls.example_config()
    arch = hf_config.architectures[0] if getattr(hf_config, "architectures", None) else cls.architectures[0]
    if not hasattr(transformers, arch):
        pytest.skip(f"transformers has no {arch} to {purpose}")
    torch.manual_seed(0)
    hf_model = getattr(transformers, arch)(hf_config).float().eval()
    for p in hf_model.parameters():
        p.data.normal_(0, 0.05)
    return hf_config, hf_model


def model_matches_transformers(cls) -> None:
    """Load the weights of the transformers implementation of the same config;
    logits of a prompt equal transformers' (fp32)."""

    hf_config, hf_model = _hf_twin(cls)
    model, _ = _tiny_model(cls, hf_config)
    loaded = model.load_weights(hf_model.state_dict().items())
    assert loaded, f"{cls.__name__}.load_weights loaded nothing"
    ids = torch.randint(0, hf_config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf_model(ids[None]).logits[0].float()
        md = make_attention_metadata([11], [11], [[3]], 16)
        hidden = model(ids, torch.arange(11), md)
        logits = model.compute_logits(hidden)
    assert logits.shape == expected.shape and logits.dtype == torch.float32, \
        f"compute_logits gave {tuple(logits.shape)} {logits.dtype}, expected {tuple(expected.shape)} float32"
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-3)


def model_uses_paged_cache(cls) -> None:
    """A prompt in one forward and the same prompt as chunk + decode steps give the same last logits."""
    hf_config = cls.example_config()
    torch.manual_seed(0)
    model, caches = _tiny_model(cls, hf_config)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ids = torch.randint(0, hf_config.vocab_size, (21,), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = model.compute_logits(model(ids, torch.arange(21), make_attention_metadata([21], [21], [[5, 2]], 16)))
        for c in caches:
            c.zero_()
        table = [[9, 4]]
        model(ids[:13], torch.arange(13), make_attention_metadata([13], [13], table, 16))
        model(ids[13:20], torch.arange(13, 20), make_attention_metadata([7], [20], table, 16))
        last = model.compute_logits(model(ids[20:], torch.tensor([20]), make_attention_metadata([1], [21], table, 16)))
    torch.testing.assert_close(last[0], whole[-1], atol=2e-4, rtol=1e-3)


def _relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def model_runs_quantized(cls) -> None:
    """A class that declares ``quantized_weights`` takes ``QuantizedWeight`` tensors in
    ``load_weights`` and quantizes at load: with every 2-D weight as a GGUF Q8_0 ``GGUFWeight``, and
    with fp8 weights, its layers hold the quantized form and its logits stay near the fp32 ones."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from ..layers import Linear
    from ..loader import _quantize_fp8
    from ..quantization.fp8 import Fp8Weight
    from ..quantization.gguf import GGUFWeight

    if not cls.quantized_weights:
        pytest.skip(f"{cls.__name__} does not declare quantized_weights: GGUF files run expanded")
    hf_config, hf_model = _hf_twin(cls, "take weights from")
    state = hf_model.state_dict()

    def q8_0(tensor: torch.Tensor):
        if tensor.dim() != 2 or tensor.shape[1] % 32:
            return tensor
        rows = quants.quantize(tensor.float().numpy(), GGMLQuantizationType.Q8_0)
        data = torch.from_numpy(np.ascontiguousarray(rows).view(np.uint8).reshape(tensor.shape[0], -1))
        return GGUFWeight(GGMLQuantizationType.Q8_0, data, tensor.shape[1])

    ids = torch.randint(0, hf_config.vocab_size, (11,), generator=torch.Generator().manual_seed(3))

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model.compute_logits(model(ids, torch.arange(11), make_attention_metadata([11], [11], [[3]], 16)))

    reference, _ = _tiny_model(cls, hf_config)
    reference.load_weights(state.items())
    expected = logits(reference)
    for name, load, kind, bound in (("GGUF Q8_0", lambda m: m.load_weights((k, q8_0(v)) for k, v in state.items()),
                                     GGUFWeight, 0.02),
                                    ("fp8", lambda m: (m.load_weights(state.items()), _quantize_fp8(m)),
                                     Fp8Weight, 0.1)):
        model, _ = _tiny_model(cls, hf_config)
        load(model)
        held = [w for m in model.modules() if isinstance(m, Linear) and m.quantized for w in m.quantized]
        assert held and all(isinstance(w, kind) for w in held), \
            f"with {name} weights the tokenmill.layers.Linear layers of {cls.__name__} hold {held[:3]}"
        error = _relative_rms(logits(model), expected)
        assert error < bound, f"{name} weights move the logits by {error:.1%} RMS (bound {bound:.0%})"


def model_runs_tensor_parallel(cls) -> None:
    """A class that declares ``supports_tensor_parallel``, built and loaded on the two ranks of a gloo
    group (two processes, as the engine's workers), gives every rank the logits it gives at size 1: a
    prefill, then a decode step over the cache the ranks split. The processes import the class by its
    module and qualified name, as a worker does."""

    if not cls.supports_tensor_parallel:
        pytest.skip(f"{cls.__name__} does not declare supports_tensor_parallel: the engine runs it at size 1 only")
    hf_config = cls.example_config()
    try:
        TensorParallel(0, 2).local_heads(hf_config.num_attention_heads, cls.kv_cache_spec(hf_config).num_kv_heads)
    except ValueError as error:
        pytest.skip(f"{cls.__name__}.example_config() does not split in two: {error}")
    hf_config, hf_model = _hf_twin(cls, "take weights from")
    state = dict(hf_model.state_dict())
    ranks = start_ranks(_tensor_parallel_logits, 2, cls.__module__, cls.__qualname__, hf_config, state)
    expected = _tensor_parallel_logits(cls.__module__, cls.__qualname__, hf_config, state)
    results = ranks.results()
    for rank, logits in enumerate(results):
        assert logits.shape == expected.shape and logits.dtype == torch.float32, \
            f"rank {rank} of 2: compute_logits gave {tuple(logits.shape)} {logits.dtype}, expected " \
            f"{tuple(expected.shape)} float32 (every rank returns the whole vocabulary)"
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-3,
                                   msg=lambda m: f"rank {rank} of 2 differs from size 1: {m}")
    assert torch.equal(results[0], results[1]), "the two ranks' logits differ: they would sample different tokens"


def _tensor_parallel_logits(module: str, qualname: str, hf_config, state: dict) -> torch.Tensor:
    """The logits of an 11-token prefill and one decode step, on this rank (size 1 outside a group)."""
    cls = importlib.import_module(module)
    for name in qualname.split("."):
        cls = getattr(cls, name)
    model, _ = _tiny_model(cls, hf_config)
    model.load_weights(state.items())
    ids = torch.randint(0, hf_config.vocab_size, (12,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        prefill = model(ids[:11], torch.arange(11), make_attention_metadata([11], [11], [[3]], 16))
        decode = model(ids[11:], torch.tensor([11]), make_attention_metadata([1], [12], [[3]], 16))
        return model.compute_logits(torch.cat([prefill, decode]))


# ---------------------------------------------------------------- tool-call and reasoning parsers

# Text no built-in markup can start with or contain: brackets, braces, tags and quotes included.
PLAIN_TEXTS = ("Hello, world!", "Paris is the capital of France.\n", "  indented\n\ttabbed  \n\n",
               "a < b and c > d; [1, 2] {x} \"quoted\" \\ back", 'JSON in prose: {"a": 1} and [2]',
               "unicode: é ß 漢字 🙂", "x")
_WORDS = ("the", "weather", "in", "Paris", "is", "sunny", "é", "漢字", "🙂", "<", ">", "{", "}", "[", "]",
          "\"", "\\", ";", ":", ",", "\n", "\t", "", "1.5")


def _random_json(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        return {f"k{i}_{rng.choice(_WORDS)}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    if depth < 3 and roll < 0.4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return rng.choice([rng.randrange(-1000, 1000), rng.random() * 100, True, False, None,
                       " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(6)))])


def _random_text(rng: random.Random) -> str:
    """Prose that starts with a letter (a leading brace is markup for some formats)."""
    return "Sure" + " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(12)))


def _chunkings(rng: random.Random, text: str) -> list[list[str]]:
    """The text whole, a character at a time, and in random pieces (the way tokens decode)."""
    chunkings = [[text], list(text)]
    for _ in range(3):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12)))) if len(text) > 1 \
            else []
        chunkings.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return chunkings


def _tool_samples(cls, rng: random.Random) -> list[tuple[str, list[tuple[str, dict]] | None, str]]:
    """(output, the calls it holds or None when unknown, its content) for generated outputs."""
    samples: list[tuple[str, list[tuple[str, dict]] | None, str]] = [(t, [], t) for t in PLAIN_TEXTS]
    try:
        cls.example_output([("f", {})])
    except NotImplementedError:
        return samples
    for _ in range(12):
        calls = [(f"get_{rng.choice(['weather', 'time', 'x'])}_{i}",
                  {f"arg{j}": _random_json(rng, 1) for j in range(rng.randrange(4))})
                 for i in range(rng.randrange(1, 4))]
        content = _random_text(rng) if rng.random() < 0.6 else ""
        samples.append((cls.example_output(calls, content), calls, content))
    return samples


def _streamed_tool_calls(parser, chunks: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed ``chunks`` to ``extract_streaming`` and ``finish``; the content and (name, arguments)
    the deltas add up to, checking the delta protocol on the way."""
    content, calls, ids = "", [], []
    previous = ""
    deltas = []
    for chunk in chunks:
        current = previous + chunk
        deltas.append(parser.extract_streaming(previous, current, chunk, None))
        previous = current
    deltas.append(parser.finish(previous, None))
    for delta in deltas:
        if delta is None:
            continue
        content += delta.content or ""
        assert delta.reasoning_content is None, f"a tool parser streamed reasoning_content {delta!r}"
        for piece in delta.tool_calls:
            if piece.index == len(calls):
                assert piece.id and piece.id.startswith("call_") and piece.name, \
                    f"the first delta of call {piece.index} must carry its id and name: {piece!r}"
                calls.append([piece.name, ""])
                ids.append(piece.id)
            else:
                assert piece.index == len(calls) - 1 and piece.id is None and piece.name is None, \
                    f"call deltas come in order, id and name only in the first: {piece!r} after {len(calls)} calls"
            calls[-1][1] += piece.arguments_delta
    assert len(set(ids)) == len(ids), f"streamed tool call ids repeat: {ids}"
    return content or None, [tuple(c) for c in calls]


def tool_parser_extracts_generated_calls(cls) -> None:
    """Outputs written with ``example_output``: the same calls come back, in order, each with a fresh
    ``call_`` id and its arguments as a JSON object string; the content is the text around them."""
    rng = random.Random(0)
    try:
        cls.example_output([("f", {})])
    except NotImplementedError:
        pytest.skip(f"{cls.__qualname__} has no example_output: checked on plain text only")
    for text, calls, content in _tool_samples(cls, rng):
        result = cls(None).extract(text, None)
        got = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
        assert got == calls, f"{cls.name}: {text!r} gave calls {got}, expected {calls}"
        for call in result.tool_calls:
            assert isinstance(call.arguments, str) and isinstance(json.loads(call.arguments), dict), \
                f"{cls.name}: arguments must be a JSON object string, got {call.arguments!r}"
        ids = [c.id for c in result.tool_calls]
        assert all(i.startswith("call_") for i in ids) and len(set(ids)) == len(ids), f"{cls.name}: ids {ids}"
        assert (result.content or "").strip() == content.strip(), \
            f"{cls.name}: {text!r} gave content {result.content!r}, expected {content!r}"


def tool_parser_leaves_plain_text_alone(cls) -> None:
    """An output without calls is its content, exactly as written, and it has no calls."""
    for text in PLAIN_TEXTS:
        result = cls(None).extract(text, None)
        assert result.content == text and not result.tool_calls, \
            f"{cls.name}: plain text {text!r} came back as {result!r}"


def tool_parser_streams_what_it_extracts(cls) -> None:
    """Every sample fed to ``extract_streaming`` in several chunkings (one character at a time
    among them) then ``finish``: the deltas add up to ``extract``'s content and calls."""
    rng = random.Random(1)
    for text, _, _ in _tool_samples(cls, rng):
        expected = cls(None).extract(text, None)
        want = (expected.content, [(c.name, c.arguments) for c in expected.tool_calls])
        for chunks in _chunkings(rng, text):
            got = _streamed_tool_calls(cls(None), chunks)
            assert got == want, f"{cls.name}: {text!r} streamed in {len(chunks)} chunks gave {got}, extract {want}"


def _streamed_reasoning(parser, chunks: list[str]) -> tuple[str | None, str | None]:
    reasoning, content, previous = "", "", ""
    deltas = []
    for chunk in chunks:
        deltas.append(parser.extract_streaming(previous, previous + chunk, chunk))
        previous += chunk
    deltas.append(parser.finish(previous))
    for delta in deltas:
        if delta is not None:
            assert not delta.tool_calls, f"a reasoning parser streamed tool calls {delta!r}"
            reasoning += delta.reasoning_content or ""
            content += delta.content or ""
    return reasoning or None, content or None


def reasoning_parser_round_trips(cls) -> None:
    """Outputs written with ``example_output`` give back their reasoning and content, non-streamed
    and streamed in several chunkings (one character at a time among them)."""
    rng = random.Random(2)
    try:
        cls.example_output("r", "c")
    except NotImplementedError:
        pytest.skip(f"{cls.__qualname__} has no example_output to generate samples with")
    for _ in range(12):
        reasoning = _random_text(rng) if rng.random() < 0.8 else ""
        content = _random_text(rng) if rng.random() < 0.8 else ""
        text = cls.example_output(reasoning, content)
        want = (reasoning or None, content or None)
        got = cls(None).extract(text)
        assert got == want, f"{cls.name}: {text!r} gave {got}, expected {want}"
        for chunks in _chunkings(rng, text):
            streamed = _streamed_reasoning(cls(None), chunks)
            assert streamed == want, f"{cls.name}: {text!r} streamed in {len(chunks)} chunks gave {streamed}"


def reasoning_parser_streams_what_it_extracts(cls) -> None:
    """Whatever the text (plain prose, a cut-off output, stray tags), the streamed split adds up
    to ``extract``'s; text without markup is kept whole, as reasoning or as content."""
    rng = random.Random(3)
    texts = [*PLAIN_TEXTS, "<", "<think", "</think>", "<think>cut off", "answer</think>", "a</think>b</think>c"]
    for text in texts:
        want = cls(None).extract(text)
        if text in PLAIN_TEXTS:
            assert (want[0] or "") + (want[1] or "") == text, f"{cls.name}: {text!r} lost text: {want}"
        for chunks in _chunkings(rng, text):
            streamed = _streamed_reasoning(cls(None), chunks)
            assert streamed == want, f"{cls.name}: {text!r} streamed in {len(chunks)} chunks gave {streamed}, " \
                                     f"extract {want}"


# ---------------------------------------------------------------- options (every kind)


def options_are_validated(cls) -> None:
    """The class's ``Options`` (if any) is a pydantic model whose defaults validate, and a key
    it does not declare is a ConfigError naming the key and the component."""
    if cls.Options is not None:
        assert isinstance(cls.Options, type) and issubclass(cls.Options, BaseModel), \
            f"{cls.__qualname__}.Options must be a pydantic BaseModel subclass, got {cls.Options!r}"
        assert isinstance(cls.validate_options({}, "section"), cls.Options), \
            f"{cls.__qualname__}.Options must validate with every option left at its default"
    with pytest.raises(ConfigError) as raised:
        cls.validate_options({"no_such_option_xyz": 1}, "section")
    message = str(raised.value)
    assert "section.no_such_option_xyz" in message and repr(cls.names()[0]) in message, message


CHECKS: dict[str, list[Callable]] = {
    ATTENTION_BACKEND: [attention_declares_cache_shape, attention_matches_reference,
                        attention_honours_window_and_soft_cap, options_are_validated],
    DRAFTER: [drafter_respects_bounds, drafter_is_deterministic, drafter_accepts_numpy, options_are_validated],
    GUIDED_DECODER: [guided_choice_contract, guided_rejects_what_it_cannot_honour, options_are_validated],
    MODEL: [model_matches_transformers, model_uses_paged_cache, model_runs_quantized, model_runs_tensor_parallel,
            options_are_validated],
    TOOL_PARSER: [tool_parser_extracts_generated_calls, tool_parser_leaves_plain_text_alone,
                  tool_parser_streams_what_it_extracts, options_are_validated],
    REASONING_PARSER: [reasoning_parser_round_trips, reasoning_parser_streams_what_it_extracts,
                       options_are_validated],
}
