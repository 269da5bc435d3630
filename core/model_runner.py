"""The model runner: turns a SchedulerOutput into one forward pass and sampled tokens.

Each step: update the persistent batch (drop finished/preempted rows, add new
ones, append block ids), lay out the scheduled tokens flat, build the
attention metadata, run the model, compute logits only where a token is
sampled (or prompt logprobs are asked for), sample.

    rows (batch order)     a: decode (1)   b: chunk (4)          c: decode (1)
    input_ids              [a5]           [b0 b1 b2 b3]          [c9]
    query_start_loc        0              1                      5       6
    logits_indices         0                                     5       (b's prompt is not done)

``input_layout`` lays the inputs out, for eager and graph steps alike, in persistent
buffers (pinned on CUDA) copied to persistent device buffers without blocking; a
decode step (one token per request) replays a CUDA graph when the runner has captured
them (see ``cuda_graphs``): the same layout, padded to the graph's size. Uploads after the
forward do not block either, so a plain step's only wait for the device is reading the
sampled tokens back (logprobs, top-k alone and drafts add their own reads).

With LoRA (``lora``, a ``LoRAManager``) each row's adapter is kept in the batch; a step loads its
adapters into device slots, lays out one slot per token beside the other inputs, and the LoRA layers
read them (see core/lora.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from .attention import AttentionMetadata
from .cuda_graphs import DecodeGraphRunner, resolve_capture_sizes
from .drafter import DraftContext, Drafter
from .input_batch import InputBatch, RowState
from .input_layout import InputLayout
from .lora import LoRAManager
from .rejection_sampler import RejectionSampler
from .request import RequestError
from .sampler import NO_TOKEN, LogprobsTensors, Sampler, SamplingMetadata, compute_logprobs_tensors, to_logprobs
from .step import Logprobs, ModelRunnerOutput, NewRequestData, SchedulerOutput
from .structured import apply_token_bitmask as _torch_apply_token_bitmask

BitmaskApplier = Callable[[torch.Tensor, torch.Tensor, "list[int] | None"], None]

logger = logging.getLogger(__name__)


class ModelRunner:
    """``drafter``: proposes draft tokens after each step (speculative decoding), or None.
    ``apply_bitmask``: masks logits with a grammar token bitmask (the guided decoder's own
    function; a plain torch one by default).
    ``max_num_tokens``: the most tokens a step holds (sizes the staging buffers; they grow if needed).
    ``cudagraph_mode``: 'off', 'capture' (decode steps replay CUDA graphs captured here, for
    ``cudagraph_capture_sizes`` or the default ladder) or 'emulate' (tests: the graph path's
    static buffers and padding, run eagerly). ``lora``: the worker's LoRAManager when adapters
    are served. The KV caches must be bound to the model first."""

    def __init__(self, model: torch.nn.Module, *, vocab_size: int, block_size: int, max_num_reqs: int,
                 max_model_len: int, device: torch.device, logprobs_mode: str = "raw_logprobs",
                 eos_token_id: int | None = None, drafter: Drafter | None = None,
                 num_speculative_tokens: int = 0, apply_bitmask: BitmaskApplier | None = None,
                 max_num_tokens: int | None = None, cudagraph_mode: str = "off",
                 cudagraph_capture_sizes: list[int] | None = None, lora: LoRAManager | None = None) -> None:
        self.model = model
        self.lora = lora
        self.max_model_len = max_model_len
        self.drafter = drafter
        self.num_speculative_tokens = num_speculative_tokens if drafter is not None else 0
        self.apply_bitmask = apply_bitmask or _torch_apply_token_bitmask
        self.rejection_sampler = RejectionSampler()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.device = device
        self.logprobs_mode = logprobs_mode
        self.eos_token_id = eos_token_id
        self.batch = InputBatch(max_num_reqs=max_num_reqs, max_model_len=max_model_len,
                                max_blocks_per_req=(max_model_len + block_size - 1) // block_size + 1,
                                vocab_size=vocab_size, device=device)
        self.sampler = Sampler()
        # Seeded generators outlive preemption so a resumed request continues its stream.
        self._generators: dict[str, torch.Generator] = {}
        # Prompt positions whose logprobs were reported, per request: a request preempted
        # by recompute computes its prompt again, and must not report those positions twice.
        self._num_prompt_logprobs_done: dict[str, int] = {}
        self.max_num_tokens = max_num_tokens or max(max_num_reqs, 2048)
        self.inputs = InputLayout(max_num_tokens=self.max_num_tokens, max_num_reqs=max_num_reqs,
                                  max_blocks_per_req=self.batch.max_blocks_per_req, block_size=block_size,
                                  max_model_len=max_model_len, device=device)
        self.graphs: DecodeGraphRunner | None = None
        if cudagraph_mode != "off":
            self.init_cuda_graphs(cudagraph_mode, cudagraph_capture_sizes)

    def init_cuda_graphs(self, mode: str, capture_sizes: list[int] | None = None) -> None:
        """Decode steps from now on replay graphs ('capture') or run the graph path's padded
        static inputs eagerly ('emulate', for tests)."""
        if mode not in ("capture", "emulate"):
            raise ValueError(f"cudagraph mode must be 'capture' or 'emulate', got {mode!r}")
        sizes = resolve_capture_sizes(capture_sizes, self.batch.max_num_reqs, self.max_num_tokens)
        if not sizes:
            self.graphs = None
            return
        graphs = DecodeGraphRunner(capture_sizes=sizes, inputs=self.inputs, emulate=mode == "emulate")
        graphs.capture(self._model_forward if self.lora is None else self._graph_forward_with_lora)
        self.graphs = graphs

    # ------------------------------------------------------------ batch state

    def _update_states(self, so: SchedulerOutput) -> dict[str, RequestError]:
        """Apply the scheduler's changes to the persistent batch; returns the new requests
        whose set-up failed (they get no row, and the scheduler ends them)."""
        for req_id in so.finished_req_ids:
            self._generators.pop(req_id, None)
            self._num_prompt_logprobs_done.pop(req_id, None)
        self.batch.remove_requests(so.finished_req_ids | so.preempted_req_ids)
        failed = {}
        for new in so.scheduled_new_reqs:
            self.batch.remove_requests({new.req_id})
            if new.lora_request is not None:
                try:
                    if self.lora is None:
                        raise ValueError("this engine serves no LoRA adapters (enable_lora is off)")
                    self.lora.load(new.lora_request)  # into the host cache: a bad folder fails this request only
                except Exception as exc:
                    logger.exception("request %s: loading its LoRA adapter failed", new.req_id)
                    failed[new.req_id] = RequestError(f"loading its LoRA adapter failed: {exc!r}")
                    continue
            try:
                self.batch.add_request(new, self._generator(new))
            except Exception as exc:  # this request's own set-up: the rest of the batch goes on
                logger.exception("request %s: setting up its sampling state failed", new.req_id)
                self.batch.remove_requests({new.req_id})
                failed[new.req_id] = RequestError(f"setting up the request's sampling state failed: {exc!r}")
        for cached in so.scheduled_cached_reqs:
            row = self.batch.req_id_to_row[cached.req_id]
            self.batch.append_blocks(row, cached.new_block_ids)
            self.batch.num_computed_tokens[row] = cached.num_computed_tokens
        return failed

    def _generator(self, new: NewRequestData) -> torch.Generator | None:
        """The request's own generator when it is seeded; kept across preemption."""
        seed = new.sampling_params.seed
        if seed is not None and new.req_id not in self._generators:
            self._generators[new.req_id] = torch.Generator(self.device).manual_seed(seed)
        return self._generators.get(new.req_id)

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        failed = self._update_states(so)
        batch = self.batch
        rows = [r for r in range(batch.num_reqs) if so.num_scheduled_tokens.get(batch.rows[r].req_id, 0) > 0]
        if not rows:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[], failed=failed)
        for req_id, drafts in so.scheduled_spec_decode_tokens.items():  # inputs past the known tokens
            row = batch.req_id_to_row[req_id]
            n = int(batch.num_tokens[row])
            batch.token_ids[row, n: n + len(drafts)] = drafts
        rows_arr = np.asarray(rows)
        counts = np.asarray([so.num_scheduled_tokens[batch.rows[r].req_id] for r in rows], dtype=np.int32)
        starts = batch.num_computed_tokens[rows_arr]
        padded_size = self.graphs.padded_size(len(rows)) if self._is_graph_step(rows_arr, counts, starts) else None
        row_slots = self._lora_slots(rows) if self.lora is not None else None
        step = self.inputs.prepare(rows_arr, counts, starts, token_ids=batch.token_ids,
                                   block_table=batch.block_table, padded_size=padded_size, lora_slots=row_slots)
        if padded_size is None:
            if self.lora is not None:  # no adapter row: the LoRA layers skip their work
                self.lora.activate(step.lora_slots if bool((row_slots >= 0).any()) else None)
            hidden = self._model_forward(step.input_ids, step.positions, step.metadata)
        else:
            hidden = self.graphs.run(step)
        query_start_loc, seq_lens = step.query_start_loc, step.seq_lens

        # a row samples when this step reaches the end of its known tokens (drafts lie beyond it)
        done = seq_lens >= batch.num_tokens[rows_arr]
        sample_rows = rows_arr[done]
        req_ids = [batch.rows[r].req_id for r in rows]
        output = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[], failed=failed)
        sampled: dict[int, list[int]] = {}
        first_verified: dict[int, int] = {}  # row -> the hidden-state index of its first verified position
        if len(sample_rows):
            sampled, first_verified = self._sample(output, hidden, so, sample_rows, query_start_loc[1:][done])
        for i, r in enumerate(rows):
            if batch.rows[r].params.prompt_logprobs is not None:
                try:
                    self._prompt_logprobs(output, hidden, r, int(starts[i]), int(query_start_loc[i]),
                                          int(counts[i]))
                except Exception as exc:  # one request's logprobs: it gets no token, the others' stand
                    logger.exception("request %s: computing its prompt logprobs failed", req_ids[i])
                    output.failed[req_ids[i]] = RequestError(f"computing prompt logprobs failed: {exc!r}")
                    sampled.pop(r, None)
        batch.num_computed_tokens[rows_arr] += counts  # rows are distinct: one add each
        output.sampled_token_ids = [sampled.get(r) or [] for r in rows]
        append_token = batch.append_token
        for r, tokens in sampled.items():
            for token in tokens:
                append_token(r, token)
        if self.drafter is not None and sampled:
            context = None
            if self.drafter.uses_hidden_states:
                context = DraftContext([hidden[first_verified[r]: first_verified[r] + len(sampled[r])]
                                        for r in sampled], self.device)
            self._propose_drafts(output, list(sampled), context)
        return output

    def _is_graph_step(self, rows: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> bool:
        """Whether this step replays a decode graph: one token per request (so no drafts),
        few enough requests, no prompt logprobs to compute."""
        graphs = self.graphs
        if graphs is None or len(rows) > graphs.max_size or int(counts.max()) != 1:
            return False
        batch = self.batch
        return not any(batch.rows[r].params.prompt_logprobs is not None and start < batch.num_prompt_tokens[r] - 1
                       for r, start in zip(rows.tolist(), starts.tolist()))

    def _lora_slots(self, rows: list[int]) -> np.ndarray:
        """Each scheduled row's adapter slot (int32, -1: base model), its adapters loaded into slots."""
        batch = self.batch
        if not batch.rows_using["lora"]:
            return np.full(len(rows), -1, dtype=np.int32)
        return self.lora.prepare([batch.rows[r].lora_request for r in rows])

    def _graph_forward_with_lora(self, input_ids: torch.Tensor, positions: torch.Tensor,
                                 metadata: AttentionMetadata) -> torch.Tensor:
        """The forward a graph captures when LoRA is served: LoRA on, reading the persistent token-slot
        buffer (every graph step rewrites it), so one graph serves any mix of adapters and base rows."""
        self.lora.activate(self.inputs.lora_slots_view(input_ids.shape[0]))
        return self._model_forward(input_ids, positions, metadata)

    def _model_forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                       metadata: AttentionMetadata) -> torch.Tensor:
        """The model on one step's inputs, after its attention backend has prepared the step."""
        metadata.backend_state = self.model.attention.prepare(metadata)
        return self.model(input_ids, positions, metadata)

    def _sample(self, output: ModelRunnerOutput, hidden: torch.Tensor, so: SchedulerOutput,
                sample_rows: np.ndarray, query_ends: np.ndarray) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Tokens for the rows whose known tokens are all computed: one sampled token, or the
        accepted drafts plus one when drafts were scheduled (one logits row per draft + 1);
        and each row's first verified position in ``hidden``."""
        batch = self.batch
        drafts = [so.scheduled_spec_decode_tokens.get(batch.rows[r].req_id, []) for r in sample_rows]
        num_logits = np.asarray([len(d) + 1 for d in drafts], dtype=np.int64)
        # the last len(d) + 1 positions of each sampling row's query
        logits_indices = np.repeat(query_ends - num_logits, num_logits) + _ranges(num_logits)
        logits = self.model.compute_logits(hidden[torch.from_numpy(logits_indices).to(self.device, non_blocking=True)])
        virtual_rows = np.repeat(sample_rows, num_logits)
        # the output each logits row follows: a request's own list, then one copy per draft taken
        outputs = [batch.rows[r].output_token_ids + list(d[:j]) if j else batch.rows[r].output_token_ids
                   for r, d in zip(sample_rows, drafts) for j in range(len(d) + 1)]
        metadata = self._sampling_metadata(virtual_rows, outputs)
        self._apply_grammar(logits, so, sample_rows, num_logits)
        wanted_by_row = [batch.rows[r].params.logprobs for r in sample_rows]
        if not any(drafts):
            result = self.sampler(logits, metadata)
            tokens = [[t] for t in result.sampled_token_ids.tolist()]
            lp_tensors, lp_rows = result.logprobs, list(range(len(sample_rows)))
        else:
            rejection = self.rejection_sampler(logits, metadata, drafts)
            tokens = rejection.token_ids
            lp_tensors = rejection.logprobs
            lp_rows = rejection.first_rows
        for i, r in enumerate(sample_rows.tolist()):
            if NO_TOKEN in tokens[i]:  # keep what came before; the scheduler ends the request after it
                tokens[i] = tokens[i][:tokens[i].index(NO_TOKEN)]
                state = batch.rows[r]
                output.failed[state.req_id] = _no_token_error(
                    state, len(state.output_token_ids) + len(tokens[i]),
                    is_guided=state.req_id in so.structured_output_request_ids)
        if lp_tensors is not None:
            self._sample_logprobs(output, lp_tensors, sample_rows, lp_rows, tokens, wanted_by_row)
        rows = sample_rows.tolist()
        return dict(zip(rows, tokens)), dict(zip(rows, (query_ends - num_logits).tolist()))

    def _sample_logprobs(self, output: ModelRunnerOutput, tensors: LogprobsTensors, sample_rows: np.ndarray,
                         first_rows: list[int], tokens: list[list[int]], wanted_by_row: list[int | None]) -> None:
        """One logprobs row per emitted token, for the requests that asked."""
        select, wanted, owners = [], [], []
        for r, first, toks, k in zip(sample_rows.tolist(), first_rows, tokens, wanted_by_row):
            if k is not None:
                select.extend(range(first, first + len(toks)))
                wanted.append(k)
                owners.append((self.batch.rows[r].req_id, len(toks)))
        if not select:
            return
        index = torch.tensor(select, device=tensors.token_ids.device)
        picked = LogprobsTensors(tensors.token_ids[index], tensors.logprobs[index], tensors.ranks[index])
        per_row = [k for (_, n), k in zip(owners, wanted) for _ in range(n)]
        merged = to_logprobs(picked, per_row, merge=True)
        start = 0
        for req_id, n in owners:
            output.logprobs[req_id] = Logprobs(merged.token_ids[start:start + n], merged.logprobs[start:start + n],
                                               merged.ranks[start:start + n])
            start += n

    def _apply_grammar(self, logits: torch.Tensor, so: SchedulerOutput, sample_rows: np.ndarray,
                       num_logits: np.ndarray) -> None:
        """Mask the logits rows of guided requests with the bitmask rows the scheduler filled
        (one per draft position plus one, in the same order as the logits rows)."""
        if so.grammar_bitmask is None or not so.structured_output_request_ids:
            return
        logits_rows, mask_rows = [], []
        first = 0
        for r, n in zip(sample_rows.tolist(), num_logits.tolist()):
            mask_first = so.structured_output_request_ids.get(self.batch.rows[r].req_id)
            if mask_first is not None:
                logits_rows.extend(range(first, first + n))
                mask_rows.extend(range(mask_first, mask_first + n))
            first += n
        if not logits_rows:
            return
        bitmask = torch.full((logits.shape[0], so.grammar_bitmask.shape[1]), -1, dtype=torch.int32)
        bitmask[logits_rows] = so.grammar_bitmask[mask_rows]
        self.apply_bitmask(logits, bitmask, logits_rows)

    def _propose_drafts(self, output: ModelRunnerOutput, rows: list[int], context: DraftContext | None) -> None:
        """Drafts for the next step, never past max_tokens or the model length: the step that
        verifies d drafts emits up to d + 1 tokens and needs d more KV slots."""
        batch = self.batch
        token_ids, room = [], []
        for r in rows:
            state = batch.rows[r]
            n = int(batch.num_tokens[r])
            left = state.params.max_tokens - len(state.output_token_ids)
            token_ids.append(batch.token_ids[r, :n])
            room.append(max(0, min(self.num_speculative_tokens, left - 1, self.max_model_len - 1 - n)))
        proposals = (self.drafter.propose(token_ids, room) if context is None
                     else self.drafter.propose(token_ids, room, context))
        if len(proposals) != len(rows):
            raise RuntimeError(f"drafter {self.drafter.name!r} returned {len(proposals)} proposals for "
                               f"{len(rows)} requests")
        for r, drafts, limit in zip(rows, proposals, room):
            drafts = [int(t) for t in drafts]
            if len(drafts) > limit:
                raise RuntimeError(f"drafter {self.drafter.name!r} proposed {len(drafts)} tokens where at "
                                   f"most {limit} were allowed")
            if drafts:
                output.draft_token_ids[batch.rows[r].req_id] = drafts

    def _prompt_logprobs(self, output: ModelRunnerOutput, hidden: torch.Tensor, row: int, start: int,
                         offset: int, count: int) -> None:
        """Logprob of each prompt token p+1 given tokens 0..p, for this chunk's positions p
        not reported before (a recomputed prompt is not reported again)."""
        batch = self.batch
        req_id = batch.rows[row].req_id
        num_prompt = int(batch.num_prompt_tokens[row])
        begin = max(start, self._num_prompt_logprobs_done.get(req_id, 0))
        end = min(start + count, num_prompt - 1)
        if end <= begin:
            return
        logits = self.model.compute_logits(hidden[offset + begin - start: offset + end - start])
        targets = torch.from_numpy(batch.token_ids[row, begin + 1: end + 1]).to(self.device, non_blocking=True)
        k = batch.rows[row].params.prompt_logprobs
        tensors = compute_logprobs_tensors(torch.log_softmax(logits, dim=-1), targets, k)
        output.prompt_logprobs[req_id] = to_logprobs(tensors, [k] * (end - begin), merge=True)
        self._num_prompt_logprobs_done[req_id] = end

    def _sampling_metadata(self, rows: np.ndarray, outputs: list[list[int]]) -> SamplingMetadata:
        """One metadata row per entry of ``rows`` (a batch row may repeat: one per draft
        position), ``outputs[i]`` being the output tokens that row's position follows.
        Columns come from the persistent batch; Python work covers only the rows that use a
        ragged feature (a seeded generator, min_tokens, logit_bias, bad words, logprobs)."""
        batch = self.batch
        columns, index = batch.sampling_columns(rows)
        greedy = batch.temperature[rows] == 0.0
        prompt_ids = None
        if columns["repetition_penalty"] is not None:
            prompt_ids = torch.from_numpy(batch.prompt_token_ids(rows)).to(self.device, non_blocking=True)
        using = {feature: _positions(rows, used) for feature, used in batch.rows_using.items()}
        states = batch.rows
        min_tokens = {}
        for i in using["min_tokens"]:
            params = states[rows[i]].params
            if len(outputs[i]) < params.min_tokens:
                stop_ids = set(params.stop_token_ids or ())
                if self.eos_token_id is not None and not params.ignore_eos:
                    stop_ids.add(self.eos_token_id)
                min_tokens[i] = (params.min_tokens, stop_ids)
        logit_bias = []
        if using["logit_bias"]:
            logit_bias = [None] * len(rows)
            for i in using["logit_bias"]:
                logit_bias[i] = states[rows[i]].params.logit_bias
        wanted = [states[rows[i]].params.logprobs for i in using["logprobs"]]
        return SamplingMetadata(
            temperature=columns["temperature"], all_greedy=bool(greedy.all()), all_random=not greedy.any(),
            top_p=columns["top_p"], top_k=columns["top_k"], min_p=columns["min_p"],
            generators={i: states[rows[i]].generator for i in using["generator"]},
            presence_penalties=columns["presence_penalty"], frequency_penalties=columns["frequency_penalty"],
            repetition_penalties=columns["repetition_penalty"], prompt_token_ids=prompt_ids,
            output_token_ids=outputs, min_tokens=min_tokens, logit_bias=logit_bias,
            allowed_token_ids_mask=batch.disallowed[index] if using["allowed_token_ids"] else None,
            bad_words_token_ids={i: states[rows[i]].params.bad_words_token_ids for i in using["bad_words"]},
            max_num_logprobs=max(wanted) if wanted else None, logprobs_mode=self.logprobs_mode)


def _positions(rows: np.ndarray, used: set[int]) -> list[int]:
    """The indices i with ``rows[i]`` in ``used`` (empty at once when no row uses the feature)."""
    if not used:
        return []
    return np.flatnonzero(np.isin(rows, np.fromiter(used, dtype=np.int64, count=len(used)))).tolist()


def _no_token_error(state: RowState, num_output_tokens: int, is_guided: bool) -> RequestError:
    """Why a request had no token to sample after ``num_output_tokens`` output tokens."""
    params = state.params
    constraints = [name for name, applies in (
        (f"structured_outputs ({params.structured_outputs.mode})" if is_guided else "", is_guided),
        (f"min_tokens={params.min_tokens}", num_output_tokens < params.min_tokens),
        ("allowed_token_ids", bool(params.allowed_token_ids)),
        ("bad_words", bool(params.bad_words_token_ids))) if applies]
    if not constraints:
        return RequestError(f"the model's logits for this request hold no finite value at output token "
                            f"{num_output_tokens}")
    return RequestError(f"no token satisfies all of this request's constraints at output token {num_output_tokens}: "
                        f"{', '.join(constraints)} exclude every token together", kind="invalid_request")


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [2, 3] -> [0, 1, 0, 1, 2]."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - lengths, lengths)
