"""Built-in model classes, and the model kinds the V1 engine refuses.

One class per family or close group, all built on the shared decoder skeleton
(``decoder.DecoderForCausalLM``, ``layers``, ``rope``):

    llama       Llama, Mistral, Qwen2, InternLM3, IQuest-Coder
    qwen3       Qwen3
    gemma       Gemma, Gemma 2, Gemma 3 (text)
    phi3        Phi-3, Phi-4
    granite     Granite 3
    olmo2       OLMo 2
    starcoder2  StarCoder2
    mixtral     Mixtral                    (mixture of experts: the sparse MLP and its loading in ``moe``)
    qwen_moe    Qwen2-MoE, Qwen3-MoE
    olmoe       OLMoE

The classes in ``v0_only`` are registered only to be refused: asking for a Mamba,
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

A family close to a built-in one can subclass ``DecoderForCausalLM`` and describe itself with a
``DecoderSpec`` instead.
"""
from tokenmill import hookimpl

from .gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from .granite import GraniteForCausalLM
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .olmo2 import Olmo2ForCausalLM
from .olmoe import OlmoeForCausalLM
from .phi3 import Phi3ForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from .starcoder2 import Starcoder2ForCausalLM
from .v0_only import V0_ONLY_MODELS

BUILTIN_MODELS = (LlamaForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM,
                  Phi3ForCausalLM, GraniteForCausalLM, Olmo2ForCausalLM, Starcoder2ForCausalLM, MixtralForCausalLM,
                  Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM)


@hookimpl
def tokenmill_register_models(register):
    for cls in BUILTIN_MODELS:
        register(cls)
    for cls in V0_ONLY_MODELS:
        register(cls)
