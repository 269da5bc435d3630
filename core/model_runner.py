"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

Each step: update the persistent batch (drop finished/preempted rows, add new
ones, append block ids), lay out the scheduled tokens flat, build the
attention metadata, run the model, compute logits only where a token is
sampled (or prompt logprobs are asked for), sample.

    rows (batch order)     a: decode (1)   b: chunk (4)          c: decode (1)
    input_ids              [a5]           [b0 b1 b2 b3]          [c9]
    query_start_loc        0              1                      5       6
    logits_indices         0                                     5       (b's prompt is not done)
"""
from __future__ import annotations

import numpy as np
import torch

from .attention import AttentionMetadata
from .input_batch import InputBatch
from .sampler import Sampler, SamplingMetadata, compute_logprobs_tensors, to_logprobs
from .step import ModelRunnerOutput, SchedulerOutput


class ModelRunner:
    def __init__(self, model: torch.nn.Module, *, vocab_size: int, block_size: int, max_num_reqs: int,
                 max_model_len: int, device: torch.device, logprobs_mode: str = "raw",
                 eos_token_id: int | None = None) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.logprobs_mode = logprobs_mode
        self.eos_token_id = eos_token_id
        self.batch = InputBatch(max_num_reqs=max_num_reqs, max_model_len=max_model_len,
                                max_blocks_per_req=(max_model_len + block_size - 1) // block_size + 1)
        self.sampler = Sampler()
        # Seeded generators outlive preemption so a resumed request continues its stream.
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------ batch state

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self._generators.pop(req_id, None)
        self.batch.remove_requests(so.finished_req_ids | so.preempted_req_ids)
        for new in so.scheduled_new_reqs:
            self.batch.remove_requests({new.req_id})
            seed = new.sampling_params.seed
            if seed is not None and new.req_id not in self._generators:
                self._generators[new.req_id] = torch.Generator(self.device).manual_seed(seed)
            self.batch.add_request(new, self._generators.get(new.req_id))
        for cached in so.scheduled_cached_reqs:
            row = self.batch.req_id_to_row[cached.req_id]
            self.batch.append_blocks(row, cached.new_block_ids)
            self.batch.num_computed_tokens[row] = cached.num_computed_tokens

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        batch = self.batch
        rows = [r for r in range(batch.num_reqs) if so.num_scheduled_tokens.get(batch.rows[r].req_id, 0) > 0]
        if not rows:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        rows_arr = np.asarray(rows)
        counts = np.asarray([so.num_scheduled_tokens[batch.rows[r].req_id] for r in rows], dtype=np.int32)
        starts = batch.num_computed_tokens[rows_arr]
        # flat token layout: request i covers positions starts[i] .. starts[i] + counts[i] - 1
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        total = int(query_start_loc[-1])
        row_of_token = np.repeat(rows_arr, counts)
        positions = np.arange(total, dtype=np.int64) - np.repeat(query_start_loc[:-1], counts) \
            + np.repeat(starts, counts)
        input_ids = batch.token_ids[row_of_token, positions]
        block_ids = batch.block_table[row_of_token, positions // self.block_size].astype(np.int64)
        slot_mapping = block_ids * self.block_size + positions % self.block_size
        seq_lens = starts + counts

        width = int(batch.num_blocks[rows_arr].max())
        md = AttentionMetadata(
            num_actual_tokens=total, max_query_len=int(counts.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc=torch.from_numpy(query_start_loc).to(self.device),
            seq_lens=torch.from_numpy(seq_lens).to(self.device),
            block_tables=torch.from_numpy(batch.block_table[rows_arr, :width]).to(self.device),
            slot_mapping=torch.from_numpy(slot_mapping).to(self.device),
            query_start_loc_cpu=torch.from_numpy(query_start_loc), seq_lens_cpu=torch.from_numpy(seq_lens))
        hidden = self.model(torch.from_numpy(input_ids).to(self.device),
                            torch.from_numpy(positions).to(self.device), md)

        # a row samples when this step reaches the end of its known tokens
        done = seq_lens >= batch.num_tokens[rows_arr]
        sample_rows = rows_arr[done]
        logits_indices = query_start_loc[1:][done] - 1
        req_ids = [batch.rows[r].req_id for r in rows]
        sampled: dict[int, int] = {}
        output = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[])
        if len(sample_rows):
            logits = self.model.compute_logits(hidden[torch.from_numpy(logits_indices).to(self.device)])
            metadata = self._sampling_metadata(sample_rows)
            result = self.sampler(logits, metadata)
            tokens = result.sampled_token_ids.tolist()
            sampled = dict(zip(sample_rows.tolist(), tokens))
            if result.logprobs is not None:
                wanted = [batch.rows[r].params.logprobs or 0 for r in sample_rows]
                for r, lp, k in zip(sample_rows.tolist(), to_logprobs(result.logprobs, wanted), wanted):
                    if batch.rows[r].params.logprobs is not None:
                        output.logprobs[batch.rows[r].req_id] = lp
        for i, r in enumerate(rows):
            if batch.rows[r].params.prompt_logprobs is not None:
                self._prompt_logprobs(output, hidden, r, int(starts[i]), int(query_start_loc[i]), int(counts[i]))
        for r in rows:
            token = sampled.get(r)
            output.sampled_token_ids.append([] if token is None else [token])
            batch.num_computed_tokens[r] += so.num_scheduled_tokens[batch.rows[r].req_id]
            if token is not None:
                batch.append_token(r, token)
        return output

    def _prompt_logprobs(self, output: ModelRunnerOutput, hidden: torch.Tensor, row: int, start: int,
                         offset: int, count: int) -> None:
        """Logprob of each prompt token p+1 given tokens 0..p, for this chunk's positions p."""
        batch = self.batch
        num_prompt = int(batch.num_prompt_tokens[row])
        end = min(start + count, num_prompt - 1)
        if end <= start:
            return
        logits = self.model.compute_logits(hidden[offset: offset + end - start])
        targets = torch.from_numpy(batch.token_ids[row, start + 1: end + 1]).to(self.device)
        k = batch.rows[row].params.prompt_logprobs
        tensors = compute_logprobs_tensors(torch.log_softmax(logits, dim=-1), targets, k)
        output.prompt_logprobs[batch.rows[row].req_id] = to_logprobs(tensors, [k] * (end - start), merge=True)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.batch
        states = [batch.rows[r] for r in rows]
        dev = self.device
        temperature = batch.temperature[rows]
        greedy = temperature == 0.0

        def column(values: np.ndarray, default: float) -> torch.Tensor | None:
            return None if np.all(values == default) else torch.from_numpy(values.copy()).to(dev)

        repetition = column(batch.repetition_penalty[rows], 1.0)
        prompt_ids = None
        if repetition is not None:
            width = int(batch.num_prompt_tokens[rows].max())
            prompt_ids = torch.full((len(rows), width), self.vocab_size, dtype=torch.int64)
            for i, s in enumerate(states):
                prompt_ids[i, : len(s.prompt_token_ids)] = torch.tensor(s.prompt_token_ids)
            prompt_ids = prompt_ids.to(dev)
        allowed_mask = None
        if any(s.params.allowed_token_ids for s in states):
            allowed_mask = torch.zeros((len(rows), self.vocab_size), dtype=torch.bool)
            for i, s in enumerate(states):
                if s.params.allowed_token_ids:
                    allowed_mask[i] = True
                    allowed_mask[i, s.params.allowed_token_ids] = False
            allowed_mask = allowed_mask.to(dev)
        min_tokens = {}
        for i, s in enumerate(states):
            if s.params.min_tokens and len(s.output_token_ids) < s.params.min_tokens:
                stop_ids = set(s.params.stop_token_ids or ())
                if self.eos_token_id is not None and not s.params.ignore_eos:
                    stop_ids.add(self.eos_token_id)
                min_tokens[i] = (s.params.min_tokens, stop_ids)
        wanted = [s.params.logprobs for s in states if s.params.logprobs is not None]
        return SamplingMetadata(
            temperature=torch.from_numpy(temperature.copy()).to(dev),
            all_greedy=bool(greedy.all()), all_random=bool((~greedy).all()),
            top_p=column(batch.top_p[rows], 1.0), top_k=column(batch.top_k[rows], 0),
            min_p=column(batch.min_p[rows], 0.0),
            generators={i: s.generator for i, s in enumerate(states) if s.generator is not None},
            presence_penalties=column(batch.presence_penalty[rows], 0.0),
            frequency_penalties=column(batch.frequency_penalty[rows], 0.0),
            repetition_penalties=repetition, prompt_token_ids=prompt_ids,
            output_token_ids=[s.output_token_ids for s in states], min_tokens=min_tokens,
            logit_bias=[s.params.logit_bias for s in states], allowed_token_ids_mask=allowed_mask,
            bad_words_token_ids={i: s.params.bad_words_token_ids for i, s in enumerate(states)
                                 if s.params.bad_words_token_ids},
            max_num_logprobs=max(wanted) if wanted else None, logprobs_mode=self.logprobs_mode)
