"""Built-in model classes, and the model kinds the V1 engine refuses.

``LlamaForCausalLM`` serves the Llama, Mistral and Qwen2 architectures. The
classes in ``v0_only`` are registered only to be refused: asking for a Mamba,
hybrid Mamba, encoder-decoder or pooling architecture raises
``RefusedComponentError`` with the reason instead of "unknown model".

A third-party model plugin looks the same:

    from tokenmill import Model, hookimpl

    class MyForCausalLM(Model):
        architectures = ("MyForCausalLM",)    # HF config.json "architectures"
        def forward(self, input_ids, positions, attn_metadata): ...   # -> hidden [T, hidden]
        def compute_logits(self, hidden): ...                           # -> fp32 [n, vocab]
        def load_weights(self, weights): ...                            # -> names loaded

    @hookimpl
    def tokenmill_register_models(register):
        register(MyForCausalLM)
"""
from tokenmill import hookimpl

from .llama import LlamaForCausalLM
from .v0_only import V0_ONLY_MODELS


@hookimpl
def tokenmill_register_models(register):
    register(LlamaForCausalLM)
    for cls in V0_ONLY_MODELS:
        register(cls)
