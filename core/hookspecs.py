"""Hook specifications: the contract between tokenmill and its plugins.

A plugin is a module (or object) with functions marked ``@tokenmill.hookimpl``
whose names match the specs below. Built-in plugins and third-party ones are
registered the same way; a third-party package exposes its plugin module in
the ``tokenmill.plugins`` entry-point group:

    # pyproject.toml of the plugin package
    [project.entry-points."tokenmill.plugins"]
    my_plugin = "my_package.tokenmill_plugin"

Every hook receives ``register``, a callable taking one component class; call
it once per class. Hooks take keyword arguments only, may be implemented by
any number of plugins, and return nothing. The registry checks each class
when it is registered (base class, ``name``, abstract methods implemented,
name unique) and refuses classes that inherit ``SupportsV0Only``.
"""
import pluggy

hookspec = pluggy.HookspecMarker("tokenmill")
hookimpl = pluggy.HookimplMarker("tokenmill")


# ---------------------------------------------------------------- attention


@hookspec
def tokenmill_register_attention_backends(register):
    """Register paged attention backends.

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.AttentionBackend``. The class sets ``name`` (selected by the
        ``attention_backend`` engine option), the supported devices, dtypes,
        head sizes and block sizes, ``kv_cache_shape(...)`` and ``forward(q, k,
        v, kv_cache, metadata, scale)``, which writes k/v at
        ``metadata.slot_mapping`` and attends causally over the paged cache
        (GQA, varlen queries after a cached prefix).
    """


# ---------------------------------------------------------------- speculative decoding


@hookspec
def tokenmill_register_drafters(register):
    """Register speculative-decoding drafters.

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.Drafter``. ``name`` is the ``speculative_config["method"]``
        that selects it; ``__init__(config)`` receives the speculative config
        section; ``propose(token_ids, max_num_tokens)`` returns at most
        ``max_num_tokens[i]`` draft tokens for each request ``i``.
    """


# ---------------------------------------------------------------- structured outputs


@hookspec
def tokenmill_register_guided_decoders(register):
    """Register structured-output backends.

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.GuidedDecoder``. ``__init__(tokenizer, vocab_size)`` is
        called once per model; ``compile(spec)`` returns a ``Grammar``
        (``accept_tokens``, ``fill_bitmask``, ``rollback``, ``is_terminated``) or
        raises ``UnsupportedStructuredOutput`` naming what it cannot enforce.
    """


# ---------------------------------------------------------------- models


@hookspec
def tokenmill_register_models(register):
    """Register model classes.

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.Model``. ``architectures`` lists the HuggingFace
        ``config.json`` architecture names it implements (each must be unique
        across plugins). The class implements ``forward(input_ids, positions,
        attn_metadata) -> hidden``, ``compute_logits(hidden)`` and
        ``load_weights(iterable of (name, tensor))``. A class that builds its
        projections and embeddings from ``tokenmill.layers`` (``Linear``,
        ``Embedding``), passes each checkpoint tensor to ``layer.load`` (a
        tensor or a ``tokenmill.quantization.QuantizedWeight``) and sets
        ``quantized_weights = True`` runs quantized: GGUF block formats kept,
        fp8 weights. A class whose layers use ``parallel=`` ("column", "row",
        "vocab"; built under ``tokenmill.distributed.get_tensor_parallel()``)
        and sets ``supports_tensor_parallel = True`` runs at any
        ``tensor_parallel_size`` that divides its heads. A class that inherits
        ``SupportsV0Only`` is listed as refused: loading a checkpoint of that
        architecture fails with its ``v0_only_reason``.
    """


# ---------------------------------------------------------------- chat output parsing


@hookspec
def tokenmill_register_tool_parsers(register):
    """Register tool-call parsers (the chat endpoint's ``tool_call_parser``).

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.tool_parsing.ToolParser``. ``__init__(tokenizer)`` is called
        once per request; ``extract(text, tools)`` splits a finished output into
        content and ``ToolCall`` objects; ``extract_streaming(previous_text,
        current_text, delta_text, tools)`` returns the ``DeltaMessage`` that the
        newest text adds (or None) and ``finish(current_text, tools)`` what was
        held back, so that the deltas add up to ``extract``'s result.
    """


@hookspec
def tokenmill_register_reasoning_parsers(register):
    """Register reasoning parsers (the chat endpoint's ``reasoning_parser``).

    :param register: call ``register(cls)`` with each subclass of
        ``tokenmill.tool_parsing.ReasoningParser``. ``extract(text)`` returns
        ``(reasoning_content, content)``; ``extract_streaming(previous_text,
        current_text, delta_text)`` and ``finish(current_text)`` stream the same
        split as ``DeltaMessage`` objects.
    """
