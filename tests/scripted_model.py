"""A test model plugin that writes fixed text, whatever the prompt: what a tiny random model cannot be
made to write (tool-call markup, reasoning tags), produced through the real engine (scheduler, runner,
sampler, detokenizer) rather than around it.

The script is cut into chunks, each an added token of its own (distinct ids, even for equal text), and
the model is a next-token table: after script token k comes script token k + 1, after the last one EOS,
after any other token (the prompt's last) the first. Register it with
``Registry(builtins=(*BUILTIN_PLUGINS, "scripted_model"))`` and build a checkpoint with
``make_scripted_checkpoint``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken

from builders import BYTE_LEVEL_EOS_TOKEN_ID, save_byte_level_tokenizer
from tokenmill import hookimpl
from tokenmill.model_base import Model

ARCHITECTURE = "ScriptedForCausalLM"


class ScriptedForCausalLM(Model):
    architectures = (ARCHITECTURE,)

    def __init__(self, hf_config, attention) -> None:
        super().__init__(hf_config, attention)
        script = list(hf_config.script_token_ids)
        following = torch.full((hf_config.vocab_size,), script[0], dtype=torch.int64)
        following[torch.tensor(script[:-1])] = torch.tensor(script[1:])
        following[script[-1]] = hf_config.eos_token_id
        self.register_buffer("following", following, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata) -> torch.Tensor:
        return input_ids.float()[:, None]  # the "hidden state" is the token itself

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(hidden.shape[0], self.hf_config.vocab_size)
        logits[torch.arange(hidden.shape[0]), self.following[hidden[:, 0].long()]] = 30.0
        return logits

    def load_weights(self, weights) -> set[str]:
        return set()


@hookimpl
def tokenmill_register_models(register):
    register(ScriptedForCausalLM)


def make_scripted_checkpoint(path: Path, script: str, chat_template: str | None = None) -> None:
    """config.json and a byte-level tokenizer whose added tokens spell ``script`` (load with load_format="dummy")."""
    tokenizer = save_byte_level_tokenizer(path)
    base = len(tokenizer)
    taken = set(tokenizer.get_vocab())
    chunks: list[str] = []
    start = 0
    while start < len(script):
        end = min(start + 4, len(script))
        while script[start:end] in taken and end < len(script):  # each chunk new text: an id of its own
            end += 1
        chunk = script[start:end]
        if chunk in taken:  # the tail repeats an earlier chunk: fold it into the last one
            chunk = chunks.pop() + chunk
        chunks.append(chunk)
        taken.add(chunk)
        start = end
    tokenizer.add_tokens([AddedToken(chunk, normalized=False, special=False) for chunk in chunks])
    ids = tokenizer.convert_tokens_to_ids(chunks)
    assert min(ids) >= base and len(set(ids)) == len(ids) and "".join(chunks) == script
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                      max_position_embeddings=1024, bos_token_id=BYTE_LEVEL_EOS_TOKEN_ID,
                                      eos_token_id=BYTE_LEVEL_EOS_TOKEN_ID, architectures=[ARCHITECTURE],
                                      script_token_ids=ids)
    config.save_pretrained(path)
