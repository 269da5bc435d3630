"""Small builders for tests of components: paged attention inputs and metadata."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention import AttentionMetadata


def make_attention_metadata(query_lens: Sequence[int], seq_lens: Sequence[int],
                            block_tables: Sequence[Sequence[int]], block_size: int,
                            device: torch.device | str = "cpu",
                            num_padding_tokens: int = 0) -> AttentionMetadata:
    """Metadata for a flat batch: request i has ``query_lens[i]`` new tokens ending
    at position ``seq_lens[i] - 1``. Padding tokens get slot -1."""
    if not (len(query_lens) == len(seq_lens) == len(block_tables)):
        raise ValueError("query_lens, seq_lens and block_tables must have one entry per request")
    slots: list[int] = []
    for query_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
        if query_len > seq_len:
            raise ValueError(f"query_len ({query_len}) must be <= seq_len ({seq_len})")
        if len(table) * block_size < seq_len:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {seq_len} tokens")
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    slots += [-1] * num_padding_tokens
    width = max((len(t) for t in block_tables), default=0)
    tables = torch.zeros((len(block_tables), max(width, 1)), dtype=torch.int32)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(list(query_lens), dtype=torch.int32), 0)
    sl = torch.tensor(list(seq_lens), dtype=torch.int32)
    return AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0), query_start_loc=qsl.to(device), seq_lens=sl.to(device),
        block_tables=tables.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=qsl, seq_lens_cpu=sl)


def shuffled_block_tables(seq_lens: Sequence[int], block_size: int, num_blocks: int,
                          generator: torch.Generator) -> list[list[int]]:
    """Disjoint, non-contiguous block tables; the cache's last block is always used
    (so a stray write to slot -1 would corrupt live data)."""
    needed = [(s + block_size - 1) // block_size for s in seq_lens]
    if sum(needed) > num_blocks:
        raise ValueError(f"{sum(needed)} blocks needed, only {num_blocks} in the cache")
    order = torch.randperm(num_blocks - 1, generator=generator).tolist()
    pool = [num_blocks - 1, *order]
    tables, start = [], 0
    for n in needed:
        tables.append(pool[start:start + n])
        start += n
    return tables


def make_byte_level_tokenizer(corpus: Sequence[str] = ("yes no maybe {\"a\": 1} [1, 2] hello world",),
                              vocab_size: int = 320):
    """A small GPT-2-style byte-level BPE (every byte is a token) with ``<eos>`` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
