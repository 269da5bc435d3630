"""POST /tokenize and POST /detokenize (vLLM's routes): a prompt or a conversation as the token ids
the generation endpoints would see, and token ids back as text.

Both run in the tokenizer pool, as generation's tokenizing does: a huge text must not stall the event
loop or the engine thread. Neither checks a prompt against max_model_len: clients tokenize to learn
whether a text fits, so the answer carries the count and the limit instead of a 400.
"""
from __future__ import annotations

from typing import Any

from ..input_processor import InputProcessor
from .errors import APIError
from .protocol import DetokenizeRequest, TokenizeRequest
from .responses import DetokenizeResponse, TokenizeResponse
from .serving import ServerState


def check_model(state: ServerState, model: str | None) -> None:
    """A 404 unless ``model`` is unset or served: a base model name or a LoRA adapter's (both use the
    base model's tokenizer)."""
    if model is not None and model not in state.model_names and model not in state.lora_adapters:
        raise APIError(404, f"The model `{model}` does not exist.", "model")


async def tokenize(state: ServerState, request: TokenizeRequest) -> TokenizeResponse:
    request.check()
    check_model(state, request.model)
    add_special_tokens = request.with_special_tokens()
    if request.messages is None:
        text = request.prompt

        def encode(processor: InputProcessor) -> list[int]:
            return list(processor.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        num_chars = len(text)
    else:
        if request.chat_template is not None and not state.trust_request_chat_template:
            raise APIError(400, "chat_template: this server does not run chat templates sent with requests; "
                                "start it with --trust-request-chat-template to allow them", "chat_template")
        conversation = [message.to_template() for message in request.messages]

        def encode(processor: InputProcessor) -> list[int]:
            text = render_chat_text(processor.tokenizer, conversation, request, state.chat_template)
            return list(processor.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        num_chars = sum(len(message["content"]) for message in conversation)

    def run(processor: InputProcessor) -> tuple[list[int], list[str] | None]:  # in the tokenizer pool
        ids = encode(processor)
        strs = list(processor.tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return ids, strs

    ids, strs = await state.engine.tokenize(run, num_chars=num_chars)
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs)


def render_chat_text(tokenizer: Any, conversation: list[dict[str, str]], request: TokenizeRequest,
                     default_template: str | None) -> str:
    """The conversation as the chat template writes it. As text, not ids, so that ``add_special_tokens``
    can apply; with it false the encoded text is what chat completions render (transformers encodes a
    template's output without special tokens)."""
    template = request.chat_template or default_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model's tokenizer has no chat template; start the server with "
                            "--chat-template", "messages")
    try:
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=request.add_generation_prompt,
                                             continue_final_message=request.continue_final_message,
                                             chat_template=template, tokenize=False,
                                             **(request.chat_template_kwargs or {}))
    except Exception as exc:  # templates raise what they like (jinja errors, raise_exception(...))
        raise APIError(400, f"the chat template cannot format these messages: {exc}", "messages") from None


async def detokenize(state: ServerState, request: DetokenizeRequest) -> DetokenizeResponse:
    request.check()
    check_model(state, request.model)
    tokens = request.tokens

    def decode(processor: InputProcessor) -> str:  # in the tokenizer pool
        for position, token_id in enumerate(tokens):
            if token_id >= processor.vocab_size:
                raise APIError(400, f"tokens: token id {token_id} at position {position} is out of range "
                                    f"[0, {processor.vocab_size})", "tokens")
        return processor.tokenizer.decode(tokens)

    return DetokenizeResponse(prompt=await state.engine.tokenize(decode, num_chars=len(tokens)))
