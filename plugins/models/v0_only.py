"""Model kinds this engine does not run: declared so the registry refuses them by name, saying why.

Each class stands for a family of HuggingFace architectures. They are never
instantiated: the registry refuses ``SupportsV0Only`` classes before looking at
their methods, so loading such a checkpoint fails with ``v0_only_reason``.
"""
from tokenmill import Model, SupportsV0Only


class MambaModels(Model, SupportsV0Only):
    architectures = ("MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM")
    v0_only_reason = ("Mamba state-space models carry a recurrent state per request, "
                      "which this engine's paged KV cache does not hold")


class HybridMambaModels(Model, SupportsV0Only):
    architectures = ("JambaForCausalLM", "ZambaForCausalLM", "Zamba2ForCausalLM", "BambaForCausalLM",
                     "FalconH1ForCausalLM", "GraniteMoeHybridForCausalLM", "NemotronHForCausalLM")
    v0_only_reason = ("hybrid attention/Mamba models need a recurrent state per request next to "
                      "the paged KV cache")


class EncoderDecoderModels(Model, SupportsV0Only):
    architectures = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                     "BartForConditionalGeneration", "MBartForConditionalGeneration",
                     "MarianMTModel", "WhisperForConditionalGeneration")
    v0_only_reason = ("encoder-decoder models need an encoder pass and cross-attention; "
                      "this engine runs decoder-only models")


class PoolingModels(Model, SupportsV0Only):
    architectures = ("BertModel", "BertForSequenceClassification", "RobertaModel",
                     "RobertaForSequenceClassification", "XLMRobertaModel",
                     "XLMRobertaForSequenceClassification")
    v0_only_reason = ("embedding/pooling models return pooled hidden states or scores, "
                      "not generated tokens")


V0_ONLY_MODELS = (MambaModels, HybridMambaModels, EncoderDecoderModels, PoolingModels)
