"""Built-in guided decoding: ``xgrammar`` with V1's no-fallback semantics.

A spec that xgrammar cannot enforce exactly is rejected with
``tokenmill.UnsupportedStructuredOutput`` when it is compiled, before the
request is scheduled (see ``xgrammar_decoder`` for the supported subset).
"""
from tokenmill import hookimpl

from .xgrammar_decoder import XGrammarDecoder


@hookimpl
def tokenmill_register_guided_decoders(register):
    register(XGrammarDecoder)
