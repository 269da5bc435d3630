"""Stop conditions checked after each token appended to a request's output.

String stops need detokenized text; the engine detects those and ends the
request with ``Scheduler.finish_requests``.
"""
from __future__ import annotations

from .request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> bool:
    """Set the request's finished status (and ``stop_reason``) if its last output
    token ends it; True if it did. The stop token itself stays in the output.

    In order: EOS (unless ``ignore_eos``) and ``stop_token_ids``, both only once
    ``min_tokens`` outputs exist; then ``max_tokens`` and ``max_model_len``
    (an EOS that is also the last allowed token counts as a stop).
    """
    params = request.sampling_params
    output_token_ids = request.output_token_ids  # called per token: lengths taken directly, not through properties
    num_output_tokens = len(output_token_ids)
    if num_output_tokens >= params.min_tokens:
        last_token_id = output_token_ids[-1]
        if last_token_id == request.eos_token_id and not params.ignore_eos:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if params.stop_token_ids and last_token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = last_token_id
            return True
    max_tokens = params.max_tokens
    if len(request.all_token_ids) >= max_model_len or (max_tokens is not None and num_output_tokens >= max_tokens):
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False
