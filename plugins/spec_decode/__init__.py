"""Built-in speculative-decoding drafters: ``ngram`` (prompt lookup, the V1 method).

Selected with ``speculative_config={"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": lo, "prompt_lookup_max": hi}``.
"""
from tokenmill import hookimpl

from .ngram import NgramDrafter


@hookimpl
def tokenmill_register_drafters(register):
    register(NgramDrafter)
