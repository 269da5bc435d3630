"""LLM: the offline API, a drop-in for vLLM's on the supported subset.

    llm = LLM()                                   # the default SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import EngineConfig
from .input_processor import PromptType
from .llm_engine import LLMEngine
from .lora_request import LoRARequest
from .output_processor import OutputKind
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is not None:
            engine_options["model"] = model
        self._init(EngineConfig.build(**engine_options))

    @classmethod
    def from_config(cls, config: EngineConfig | Mapping[str, Any] | str | Path, **overrides: Any) -> LLM:
        """Build from an EngineConfig, a dict, or a JSON/TOML file (keyword overrides win)."""
        if isinstance(config, EngineConfig):
            config = config.model_dump(exclude_none=True)
        llm = cls.__new__(cls)
        llm._init(EngineConfig.build(config, **overrides))
        return llm

    def _init(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config)
        # Outputs per request not yet taken by its consumer: whoever steps the engine (a
        # generate call, or one of several open streams) steps every request, so each
        # output waits here for the consumer of its own request.
        self._inbox: dict[str, list[RequestOutput]] = {}

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        """Stop the engine's worker processes or actors now (they also stop when the LLM is collected
        and at exit)."""
        self.engine.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """What a prompt gets when no sampling params are given: the model's
        generation_config.json defaults (see ``generation_config``), else SamplingParams()."""
        return self.engine.core.generation_defaults.default_sampling_params()

    # ------------------------------------------------------------ generation

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order. ``lora_request``: the adapter every prompt
        runs with, or a list with one (or None, the base model) per prompt. ``priority``: one int per
        prompt, lower first (needs ``scheduling_policy="priority"``); None: all 0."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _as_params_list(sampling_params, len(prompts))
        request_ids = self._add_all(prompts, params, _as_lora_list(lora_request, len(prompts)),
                                    _as_priority_list(priority, len(prompts)))
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate a reply to each conversation, formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template,
                                                                 chat_template_kwargs)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation: Conversation, add_generation_prompt: bool = True,
                            chat_template: str | None = None,
                            chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        tokenizer = self.engine.tokenizer
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                            chat_template=chat_template, tokenize=True,
                                            **(chat_template_kwargs or {}))
        if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None, *,
               lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Incremental outputs (only the new text and tokens each time) until the request ends.
        Closing the iterator early aborts the request."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        request_id = self._add(prompt, sampling_params, OutputKind.DELTA, lora_request)
        finished = False
        try:
            while not finished:
                if not self._inbox[request_id]:
                    self._step()
                for output in self._take(request_id):
                    finished = output.finished
                    yield output
        finally:
            del self._inbox[request_id]
            if not finished:
                self.engine.abort_request([request_id])

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """End requests in any state; their consumers get a final output with finish reason "abort"."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for final in self.engine.abort_request(ids):
            if final.request_id in self._inbox:
                self._inbox[final.request_id].append(final)

    def _add(self, prompt: PromptType, params: SamplingParams, kind: OutputKind,
             lora_request: LoRARequest | None = None, priority: int = 0) -> str:
        request_id = self.engine.next_request_id()
        self.engine.add_request(request_id, prompt, params, kind, lora_request, priority)
        self._inbox[request_id] = []
        return request_id

    def _step(self) -> list[str]:
        """One engine step; returns the ids of the requests whose inboxes got outputs."""
        delivered = []
        for output in self.engine.step():
            inbox = self._inbox.get(output.request_id)
            if inbox is not None:
                inbox.append(output)
                delivered.append(output.request_id)
        return delivered

    def _take(self, request_id: str) -> list[RequestOutput]:
        outputs, self._inbox[request_id] = self._inbox[request_id], []
        return outputs

    def _add_all(self, prompts: list[PromptType], params: list[SamplingParams],
                 loras: list[LoRARequest | None], priorities: list[int]) -> list[str]:
        added: list[str] = []
        try:
            for prompt, p, lora, priority in zip(prompts, params, loras, priorities):
                added.append(self._add(prompt, p, OutputKind.FINAL_ONLY, lora, priority))
        except Exception:
            self.engine.abort_request(added)  # all or nothing: the engine stays clean
            for request_id in added:
                del self._inbox[request_id]
            raise
        return added

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while pending:
                # only the requests this step delivered to: a step leaves every other inbox as it was
                for request_id in self._step():
                    if request_id not in pending:
                        continue
                    for output in self._take(request_id):
                        if output.finished:
                            results[request_id] = output
                            pending.discard(request_id)
                            bar.update(1)
        except BaseException:
            self.engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
            for request_id in request_ids:
                del self._inbox[request_id]
        return [results[r] for r in request_ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int) and not isinstance(prompts[0], bool):
        return [prompts]  # one prompt given as token ids (the input processor checks every id)
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts; give one or one per prompt")
    return params


def _as_lora_list(lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
                  count: int) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * count
    loras = list(lora_request)
    if len(loras) != count:
        raise ValueError(f"lora_request must be one LoRARequest or a list with one per prompt ({count}), got "
                         f"{len(loras)}")
    for i, lora in enumerate(loras):
        if lora is not None and not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request[{i}] must be a LoRARequest or None, got {type(lora).__name__}")
    return loras


def _as_priority_list(priority: Sequence[int] | None, count: int) -> list[int]:
    """One priority per prompt, as vLLM takes them (a list even for one prompt)."""
    if priority is None:
        return [0] * count
    if isinstance(priority, (int, str, bytes)) or not isinstance(priority, Sequence):
        raise ValueError(f"priority must be a list with one int per prompt ({count}), got {priority!r}")
    priorities = list(priority)
    if len(priorities) != count:
        raise ValueError(f"priority must be a list with one int per prompt ({count}), got {len(priorities)}")
    return priorities
