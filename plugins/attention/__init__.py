"""Built-in attention backends: ``torch`` (reference, CPU default) and ``triton`` (CUDA default)."""
from tokenmill import hookimpl

from .torch_backend import TorchAttentionBackend
from .triton_backend import TritonAttentionBackend


@hookimpl
def tokenmill_register_attention_backends(register):
    register(TorchAttentionBackend)
    register(TritonAttentionBackend)
