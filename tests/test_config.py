"""EngineConfig: vLLM's option names, sections, files, and errors that name the field."""
import json

import pytest

from tokenmill import ConfigError, EngineConfig


def test_flat_vllm_names_land_in_their_sections():
    config = EngineConfig.build(model="m", dtype="half", block_size=32, enable_prefix_caching=False,
                                num_gpu_blocks_override=100, max_num_seqs=4, max_num_batched_tokens=512,
                                enable_chunked_prefill=False, attention_backend="torch", device="cpu", seed=7)
    assert config.model.model == "m" and config.model.dtype == "float16"
    assert (config.cache.block_size, config.cache.enable_prefix_caching, config.cache.num_gpu_blocks_override) \
        == (32, False, 100)
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (4, 512)
    assert config.scheduler.enable_chunked_prefill is False
    assert (config.attention_backend, config.device, config.seed) == ("torch", "cpu", 7)


def test_nested_sections_and_flat_names_mix():
    config = EngineConfig.build({"cache": {"block_size": 64}, "model": {"model": "x"}}, max_num_seqs=2)
    assert (config.cache.block_size, config.model.model, config.scheduler.max_num_seqs) == (64, "x", 2)


def test_json_and_toml_files_with_keyword_overrides(tmp_path):
    as_json = tmp_path / "engine.json"
    as_json.write_text(json.dumps({"block_size": 8, "speculative_config": {"method": "ngram",
                                                                           "num_speculative_tokens": 3}}))
    config = EngineConfig.build(as_json, block_size=32)
    assert config.cache.block_size == 32 and config.speculative.num_speculative_tokens == 3
    as_toml = tmp_path / "engine.toml"
    as_toml.write_text('max_num_seqs = 3\n[cache]\nblock_size = 8\n')
    config = EngineConfig.build(as_toml)
    assert (config.scheduler.max_num_seqs, config.cache.block_size) == (3, 8)


def test_missing_or_unknown_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig.build(tmp_path / "nope.toml")
    (tmp_path / "c.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"must end in \.json or \.toml"):
        EngineConfig.build(tmp_path / "c.yaml")


def test_unknown_option_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown engine option 'block_sise'; did you mean 'block_size'\?"):
        EngineConfig.build(block_sise=16)
    with pytest.raises(ConfigError, match=r"cache\.colour: unknown option"):
        EngineConfig.build(cache={"colour": 1})


@pytest.mark.parametrize("option", ["best_of", "swap_space", "preemption_mode"])
def test_deprecated_v1_options_say_so(option):
    with pytest.raises(ConfigError, match=rf"{option}: .*deprecated in V1"):
        EngineConfig.build(**{option: 4})


def test_weight_offloading_is_refused_as_unsupported_not_as_deprecated():
    with pytest.raises(ConfigError, match=r"cpu_offload_gb: offloading weights to CPU memory is not supported by "
                                          r"this engine"):
        EngineConfig.build(cpu_offload_gb=4)


def test_deprecated_option_inside_a_section_says_so():
    with pytest.raises(ConfigError, match=r"cache\.swap_space: .*deprecated in V1"):
        EngineConfig.build(cache={"swap_space": 4})


@pytest.mark.parametrize("options, message", [
    ({"block_size": 12}, r"cache\.block_size: must be a power of two between 1 and 256, got 12"),
    ({"max_num_seqs": 0}, r"scheduler\.max_num_seqs: .*greater than or equal to 1, got 0"),
    ({"gpu_memory_utilization": 1.5}, r"cache\.gpu_memory_utilization: .*less than or equal to 1"),
    ({"dtype": "int8"}, r"model\.dtype: .*'auto', 'float32', 'float16' or 'bfloat16'"),
    ({"device": "tpu"}, r"device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"load_format": "pt"}, r"model\.load_format"),
])
def test_out_of_range_values_name_the_field_and_the_rule(options, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig.build(**options)


def test_speculative_config_keeps_the_drafters_own_options_apart():
    spec = EngineConfig.build(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                  "prompt_lookup_max": 4, "lookback": 7}).speculative
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 2)
    assert spec.options == {"prompt_lookup_max": 4, "lookback": 7}  # the drafter validates them
    with pytest.raises(ConfigError, match=r"speculative\.num_speculative_tokens: must be >= 1, got 0"):
        EngineConfig.build(speculative_config={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ConfigError, match=r"speculative\.method: Field required"):
        EngineConfig.build(speculative_config={"num_speculative_tokens": 1})


def test_structured_outputs_backend_names_a_decoder_without_fallback():
    assert EngineConfig.build().structured_outputs.backend == "xgrammar:no_fallback"
    named = EngineConfig.build(structured_outputs_config={"backend": "outlines", "whitespace": "compact"})
    assert (named.structured_outputs.backend, named.structured_outputs.decoder) == ("outlines:no_fallback",
                                                                                   "outlines")
    assert named.structured_outputs.options == {"whitespace": "compact"}  # the decoder validates them
    with pytest.raises(ConfigError, match=r"structured_outputs\.backend: must be a guided decoder's name, "
                                          r"optionally with ':no_fallback' \(V1 has no fallback mode\), "
                                          r"got 'xgrammar:auto'"):
        EngineConfig.build(structured_outputs_config={"backend": "xgrammar:auto"})


def test_assignment_is_validated_too():
    config = EngineConfig.build()
    with pytest.raises(ValueError, match="power of two"):
        config.cache.block_size = 3
