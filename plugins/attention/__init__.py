"""Built-in attention backends: ``torch`` (reference, CPU default)."""
from tokenmill import hookimpl

from .torch_backend import TorchAttentionBackend


@hookimpl
def tokenmill_register_attention_backends(register):
    register(TorchAttentionBackend)
