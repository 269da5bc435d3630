"""Incremental detokenization of one request's output, with stop strings.

The output processor feeds each step's new token ids to ``update`` and asks
``get_next_output_text`` for the text to stream. Decoding is streaming: a
``tokenizers`` ``DecodeStream`` re-decodes only a short window of recent
tokens per step, never the whole sequence, so the cost per token does not
grow with the length of the request.

    prompt tail (context only)      output tokens
    [p5 p6 p7 p8 p9 p10 p11 p12]    [o0 o1 o2 ...]
                                     |<-- output_text -->|<- held back ->|
                                     |<-- streamed so far ->|

The window starts with the prompt's last tokens so that the first output
token decodes as it would mid-text (its leading space kept). While the
request runs, the last ``max(len(stop)) - 1`` characters are held back: they
could be the start of a stop string that the next tokens complete, and text
once streamed cannot be taken back.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens that seed the stream: enough context for leading-space rules,
# and room to drop the few tokens of a character the prompt leaves unfinished.
_NUM_PRIMING_TOKENS = 8
# The message tokenizers raises when a decoder rewrites text it already returned.
_INVALID_PREFIX = "Invalid prefix encountered"
_REPLACEMENT_CHAR = "\ufffd"
# Pieces of text kept apart before they are joined into the output text: a long request is copied
# once per this many tokens rather than at every one, and its pieces cost little memory.
_MAX_PENDING_PIECES = 64


class IncrementalDetokenizer:
    """Turns one request's output token ids into text, step by step, and finds its stop strings.

    ``stop_terminated`` (vLLM V1 semantics): the last token of the update
    ended the request as EOS or a stop token id; it stays in
    ``output_token_ids`` but its text is left out, unless
    ``include_stop_str_in_output``.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError("IncrementalDetokenizer needs a fast tokenizer (one with a tokenizers "
                            f"backend_tokenizer), got {type(tokenizer).__name__}")
        for stop_str in stop:
            if not isinstance(stop_str, str) or not stop_str:
                raise ValueError(f"stop strings must be non-empty str, got {stop_str!r}")
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # With the stop string itself in the output, nothing needs holding back.
        self.stop_buffer_length = (0 if include_stop_str_in_output or not self.stop
                                   else max(map(len, self.stop)) - 1)
        self.output_token_ids: list[int] = []
        self.num_taken_tokens = 0  # of the last update's tokens
        self._output_text = ""
        # text decoded since ``_output_text`` was last joined: without stop strings nothing reads the
        # text until an output asks for it, so a long request is not copied whole at every token
        self._pending_text: list[str] = []
        self._num_streamed_chars = 0
        self._stream = _primed_stream(backend, list(prompt_token_ids), skip_special_tokens)
        # Decoders such as WordPiece join every token with a space; without skipping special tokens
        # vLLM can glue adjacent added tokens instead. Byte-level decoders add no spaces anyway.
        self._added_tokens: dict[int, str] | None = None
        self._last_was_added = False
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._added_tokens = {token_id: added.content
                                  for token_id, added in backend.get_added_tokens_decoder().items()}
            self._last_was_added = bool(prompt_token_ids) and prompt_token_ids[-1] in self._added_tokens

    @property
    def output_text(self) -> str:
        """All the output text so far, cut at a matched stop string."""
        return self._joined_text()

    def _joined_text(self) -> str:
        if self._pending_text:
            self._output_text += "".join(self._pending_text)
            self._pending_text.clear()
        return self._output_text

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool) -> str | None:
        """Detokenize the request's new output tokens, in order; return the stop string they completed.
        ``num_taken_tokens`` then says how many of them belong to the output (those up to the
        one completing the stop string; all of them otherwise).

        On a match the output text is cut at the start of the stop string (after
        it with ``include_stop_str_in_output``); the caller finishes the request
        with that string as its stop reason. Returns None when no stop string matched.
        """
        self.num_taken_tokens = 0
        if not new_token_ids:
            return None
        skipped_stop_token = stop_terminated and not self.include_stop_str_in_output
        if not self.stop:
            if len(new_token_ids) == 1 and not skipped_stop_token and self._added_tokens is None:
                text = self._step(new_token_ids[0])  # one token per step (no drafts): the common case
                if text:
                    self._pending_text.append(text)
                    if len(self._pending_text) >= _MAX_PENDING_PIECES:
                        self._joined_text()
            else:
                decoded_ids = new_token_ids[:-1] if skipped_stop_token else new_token_ids
                self._pending_text.extend([self._decode_next(token_id) for token_id in decoded_ids])
            self.output_token_ids.extend(new_token_ids)
            self.num_taken_tokens = len(new_token_ids)
            return None
        new_token_ids = list(new_token_ids)
        decoded_ids = new_token_ids[:-1] if skipped_stop_token else new_token_ids
        # token by token: when one step brings several tokens (speculative decoding), the
        # tokens after the one that completes a stop string are not part of the output
        for token_id in decoded_ids:
            num_checked_chars = len(self._output_text)
            self._output_text += self._decode_next(token_id)
            self.output_token_ids.append(token_id)
            self.num_taken_tokens += 1
            stop_str = self._check_stop_strings(num_checked_chars)
            if stop_str is not None:
                return stop_str
        if skipped_stop_token:
            self.output_token_ids.append(new_token_ids[-1])
            self.num_taken_tokens += 1
        return None

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to emit now: all of it (``delta=False``) or only what is new since the last delta call.

        Until ``finished`` the last ``stop_buffer_length`` characters are held
        back so that a partial stop string never reaches the client.
        """
        output_text = self._joined_text()
        num_ready = len(output_text) - (0 if finished else self.stop_buffer_length)
        if not delta:
            return output_text[:max(num_ready, 0)]
        if num_ready <= self._num_streamed_chars:
            return ""
        text = output_text[self._num_streamed_chars:num_ready]
        self._num_streamed_chars = num_ready
        return text

    def _decode_next(self, token_id: int) -> str:
        text = self._step(token_id) or ""
        if self._added_tokens is not None:
            content = self._added_tokens.get(token_id)
            if content is not None and self._last_was_added:
                text = content
            self._last_was_added = content is not None
        return text

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:  # tokenizers raises a bare Exception
            if not str(error).startswith(_INVALID_PREFIX):
                raise
            # Some decoders rewrite earlier text when a token is added (decoding is not
            # monotonic), which breaks the stream's prefix bookkeeping. Start a fresh
            # stream: the text already emitted stands, decoding goes on from this token.
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._backend, token_id)

    def _check_stop_strings(self, num_checked_chars: int) -> str | None:
        """Find the earliest stop string that ends in the new text; ties go to the first listed.

        Text before ``num_checked_chars`` held no stop string, so a match must end
        after it: each search starts ``len(stop_str) - 1`` characters before the new text.
        """
        if len(self._output_text) == num_checked_chars:
            return None
        best_index, best_stop = -1, None
        for stop_str in self.stop:
            index = self._output_text.find(stop_str, max(num_checked_chars - len(stop_str) + 1, 0))
            if index != -1 and (best_stop is None or index < best_index):
                best_index, best_stop = index, stop_str
        if best_stop is None:
            return None
        cut = best_index + len(best_stop) if self.include_stop_str_in_output else best_index
        self._output_text = self._output_text[:cut]
        return best_stop


def _primed_stream(backend: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> DecodeStream:
    """A DecodeStream whose context is the prompt's last tokens, so output text does not repeat them.

    The stream takes the decoded priming ids as the prefix of everything it
    decodes later. If the prompt ends inside a UTF-8 character that prefix
    would end in U+FFFD and never match, so those trailing tokens are stepped
    in afterwards (their text is prompt text, dropped): the character they
    start then belongs to the output token that completes it.
    """
    tail = prompt_token_ids[-_NUM_PRIMING_TOKENS:]
    num_clean = len(tail)
    while num_clean and backend.decode(tail[:num_clean], skip_special_tokens=skip_special_tokens) \
            .endswith(_REPLACEMENT_CHAR):
        num_clean -= 1
    stream = DecodeStream(ids=tail[:num_clean], skip_special_tokens=skip_special_tokens)
    for token_id in tail[num_clean:]:
        stream.step(backend, token_id)
    return stream
