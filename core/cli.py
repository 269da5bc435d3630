"""The ``tokenmill`` command line: features, generate, chat, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__


def _features(args: argparse.Namespace) -> int:
    from .features import format_table
    from .registry import Registry

    registry = Registry(on_plugin_error=args.plugin_errors)
    matrix = registry.feature_matrix()
    if args.model is not None:
        matrix["features"].append(_model_attention_row(registry, args))
    print(json.dumps(matrix, indent=2, sort_keys=True) if args.json else format_table(matrix))
    return 0


def _model_attention_row(registry: Any, args: argparse.Namespace) -> dict[str, str]:
    """Which attention backend ``args.model`` gets on ``args.device``, and why."""
    from .components import ATTENTION_BACKEND
    from .engine_core import resolve_device
    from .features import attention_choice_for_model
    from .loader import load_hf_config, resolve_dtype, resolve_model_class, resolve_model_source

    hf_config = load_hf_config(resolve_model_source(args.model, "auto"))
    spec = resolve_model_class(registry, hf_config).kv_cache_spec(hf_config)
    device = resolve_device(args.device)
    return attention_choice_for_model(registry.available(ATTENTION_BACKEND), model=args.model, device=device,
                                      dtype=resolve_dtype(args.dtype, hf_config, device), head_size=spec.head_size,
                                      block_size=args.block_size, sliding_window=spec.uses_sliding_window,
                                      logits_soft_cap=spec.uses_logits_soft_cap)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("model", "dtype", "max_model_len", "block_size", "max_num_seqs", "max_num_batched_tokens",
                 "attention_backend", "device", "seed", "load_format", "num_gpu_blocks_override",
                 "gpu_memory_utilization", "generation_config", "kv_cache_dtype", "quantization",
                 "tensor_parallel_size", "distributed_executor_backend", "max_loras", "max_lora_rank",
                 "max_cpu_loras", "scheduling_policy"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    if args.enforce_eager:
        options["enforce_eager"] = True
    if args.async_scheduling:
        options["async_scheduling"] = True
    if args.enable_lora:
        options["enable_lora"] = True
    if args.speculative_config:
        options["speculative_config"] = json.loads(args.speculative_config)
    options.update(parse_option(item) for item in args.option)
    return options


def parse_option(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from ``-o``: the value parsed as JSON when it can be, else the string."""
    key, _, raw = item.partition("=")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _make_llm(args: argparse.Namespace):
    from .llm import LLM

    options = _engine_options(args)
    return LLM.from_config(args.config, **options) if args.config else LLM(**options)


def _sampling(args: argparse.Namespace):
    from .sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.sampling_seed)


def _generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling(args)
    prompts = args.prompt or ["What is the capital of France?"]
    if args.raw:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        print(f"> {prompt}\n{completion.text}\n[{len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason}]")
    return 0


def _chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling(args)
    history: list[dict[str, str]] = []
    print("tokenmill chat: an empty line or Ctrl-D ends the session", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        prompt = {"prompt_token_ids": llm.apply_chat_template(history)}
        reply = []
        print("assistant> ", end="", flush=True)
        for output in llm.stream(prompt, params):
            piece = output.outputs[0].text
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .config import EngineConfig
    from .server import serve

    options = _engine_options(args)
    if args.model_tag is not None:
        if options.setdefault("model", args.model_tag) != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {options['model']!r}")
    if args.max_num_queued_requests is not None:
        options["max_num_queued_requests"] = args.max_num_queued_requests
    config = EngineConfig.build(args.config, **options)
    return serve(config, host=args.host, port=args.port, api_key=args.api_key,
                 served_model_name=args.served_model_name, chat_template=args.chat_template,
                 trust_request_chat_template=args.trust_request_chat_template,
                 max_body_bytes=args.max_request_body_bytes, shutdown_timeout=args.shutdown_timeout,
                 log_level=args.log_level, lora_modules=_lora_modules(args.lora_modules),
                 allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                 allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials,
                 enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
                 reasoning_parser=args.reasoning_parser)


def _json_str_list(value: str) -> list[str]:
    """A JSON list of strings (vLLM's form of the CORS flags: ``'["https://app.example"]'``)."""
    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}: {exc}") from None
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {value!r}")
    return items


def _lora_modules(items: list[str]) -> dict[str, str]:
    """``--lora-modules NAME=PATH ...`` (or vLLM's JSON form ``{"name": ..., "path": ...}``) as name -> path."""
    modules: dict[str, str] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            entry = json.loads(item)
            name, path = entry.get("name"), entry.get("path")
        else:
            name, _, path = item.partition("=")
        if not name or not path:
            raise ValueError(f"--lora-modules: expected NAME=PATH, got {item!r}")
        modules[name] = path
    return modules


def _add_engine_arguments(parser: argparse.ArgumentParser, sampling: bool = True) -> None:
    g = parser.add_argument_group("engine options (vLLM names)")
    g.add_argument("--model", help="a model directory, a .gguf file, or the default model's name")
    g.add_argument("--config", help="engine config file (.json or .toml); flags override it")
    g.add_argument("--dtype")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                   help="'fcfs' (default: arrival order) or 'priority' (a request's priority, lower first)")
    g.add_argument("--num-gpu-blocks-override", type=int)
    g.add_argument("--attention-backend")
    g.add_argument("--device")
    g.add_argument("--seed", type=int)
    g.add_argument("--load-format")
    g.add_argument("--generation-config",
                   help="'auto' (the model's generation_config.json: EOS ids, sampling defaults), 'vllm' or a folder")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every step runs eagerly")
    g.add_argument("--async-scheduling", action="store_true",
                   help="schedule step N+1 while step N runs, overlapping host work with the model's")
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--kv-cache-dtype", help="'auto' (the model's dtype), 'fp8' (= 'fp8_e4m3') or 'fp8_e5m2'")
    g.add_argument("--quantization", help="unset: a .gguf keeps its block formats; 'fp8' quantizes a float "
                   "checkpoint at load; 'none' expands a .gguf to the dtype")
    g.add_argument("-tp", "--tensor-parallel-size", type=int, help="ranks that each hold a shard of every layer")
    g.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"],
                   help="'uni' (this process, size 1), 'mp' (a process per rank; the default above 1), 'ray'")
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT folders) on the base model")
    g.add_argument("--max-loras", type=int, help="adapters resident on the device at once (default 1)")
    g.add_argument("--max-lora-rank", type=int, help="the largest adapter rank accepted (default 16)")
    g.add_argument("--max-cpu-loras", type=int, help="adapters kept loaded in host memory (default: max-loras)")
    g.add_argument("--speculative-config", help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other engine option (value parsed as JSON when it can be)")
    if not sampling:
        return
    s = parser.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--sampling-seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine with vLLM V1 semantics")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    features = sub.add_parser("features", help="what this installation supports (components and V1 features)")
    features.add_argument("--json", action="store_true", help="print stable JSON instead of a table")
    features.add_argument("--plugin-errors", choices=("raise", "warn"), default="raise",
                          help="a plugin that fails to load is an error (default) or a warning")
    features.add_argument("--model", default=None,
                          help="also say which attention backend this model gets, and why (no weights are read)")
    features.add_argument("--device", default="auto", help="with --model: cpu, cuda or auto")
    features.add_argument("--dtype", default="auto", help="with --model: the dtype the engine would run")
    features.add_argument("--block-size", type=int, default=16, help="with --model: the KV block size")
    features.set_defaults(func=_features)
    generate = sub.add_parser("generate", help="generate replies to prompts (chat template unless --raw)")
    generate.add_argument("prompt", nargs="*", help="default: 'What is the capital of France?'")
    generate.add_argument("--raw", action="store_true", help="complete the prompt text without the chat template")
    _add_engine_arguments(generate)
    generate.set_defaults(func=_generate)
    chat = sub.add_parser("chat", help="an interactive, streamed chat")
    _add_engine_arguments(chat)
    chat.set_defaults(func=_chat)
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra)")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model (as --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every route but /health "
                            "(default: $TOKENMILL_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the names clients may use (default: the model); responses echo the one used, "
                            "metrics carry the first")
    serve.add_argument("--allowed-origins", type=_json_str_list, metavar="JSON",
                       help='CORS: the origins browsers may call from, e.g. \'["https://app.example"]\' or '
                            '\'["*"]\' (default: none, no CORS headers)')
    serve.add_argument("--allowed-methods", type=_json_str_list, metavar="JSON",
                       help='CORS: the methods allowed (default: \'["*"]\'); needs --allowed-origins')
    serve.add_argument("--allowed-headers", type=_json_str_list, metavar="JSON",
                       help='CORS: the request headers allowed (default: \'["*"]\'); needs --allowed-origins')
    serve.add_argument("--allow-credentials", action="store_true",
                       help="CORS: let browsers send cookies and Authorization; needs --allowed-origins")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters served by name (a request's model field picks one); needs --enable-lora")
    serve.add_argument("--chat-template", help="a Jinja chat template, or a file holding one")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="run the chat_template a request sends (off: a template is code, and can take "
                            "unbounded time)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="let chat requests use tool_choice \"auto\" (needs --tool-call-parser)")
    serve.add_argument("--tool-call-parser", metavar="NAME",
                       help="the registered tool parser that finds \"auto\" tool calls in the model's text "
                            "(built in: hermes, llama3_json, mistral)")
    serve.add_argument("--reasoning-parser", metavar="NAME",
                       help="the registered reasoning parser that moves the model's reasoning to reasoning_content "
                            "(built in: think)")
    serve.add_argument("--max-num-queued-requests", type=int,
                       help="refuse new requests (503) once this many wait to be scheduled (default: no limit)")
    serve.add_argument("--max-request-body-bytes", type=int, default=8 << 20)
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may take to finish after SIGINT/SIGTERM")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_engine_arguments(serve, sampling=False)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import TokenmillError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TokenmillError, ValueError) as exc:  # config, input and plugin errors: one clear line
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
