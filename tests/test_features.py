"""The feature matrix and `tokenmill features`, computed from what is registered."""
import json
import os
import subprocess
import sys

from tokenmill import Registry
from tokenmill.features import format_table

from test_registry import DRAFTER_PLUGIN, V0_MODEL_PLUGIN


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def feature(matrix, name):
    return next(f for f in matrix["features"] if f["feature"] == name)


def test_json_shape_lists_components_and_v1_features():
    result = run_cli("features", "--json")
    assert result.returncode == 0, result.stderr
    matrix = json.loads(result.stdout)
    assert set(matrix) >= {"components", "features"}
    for row in matrix["components"]:
        assert set(row) >= {"kind", "name", "provider", "status", "reason"}
        assert row["status"] in ("available", "refused")
    for row in matrix["features"]:
        assert set(row) >= {"feature", "status", "detail"}
    names = {f["feature"] for f in matrix["features"]}
    assert names >= {"attention_backends", "model_architectures", "unsupported_model_kinds", "spec_decode_methods",
                     "structured_output_backends", "logprobs", "prompt_logprobs", "prefix_caching",
                     "deprecated_options"}
    assert {"attention_backend"} <= {c["kind"] for c in matrix["components"]}


def test_third_party_drafter_becomes_a_spec_decode_method(plugin_site):
    plugin_site("acme-drafters", DRAFTER_PLUGIN, version="1.2.0")
    matrix = Registry().feature_matrix()
    row = next(c for c in matrix["components"] if c["name"] == "repeat-last")
    assert (row["kind"], row["provider"], row["status"]) == ("drafter", "acme-drafters 1.2.0", "available")
    assert "repeat-last" in feature(matrix, "spec_decode_methods")["detail"]


def test_refused_model_shows_in_unsupported_model_kinds(plugin_site):
    plugin_site("acme-mamba", V0_MODEL_PLUGIN)
    matrix = Registry().feature_matrix()
    row = next(c for c in matrix["components"] if c["name"] == "AcmeMambaForCausalLM")
    assert row["status"] == "refused" and "recurrent state" in row["reason"]
    kinds = feature(matrix, "unsupported_model_kinds")
    assert kinds["status"] == "refused" and "AcmeMambaForCausalLM" in kinds["detail"]
    assert "AcmeMambaForCausalLM" not in feature(matrix, "model_architectures")["detail"]


def test_table_has_a_row_per_component_and_feature():
    matrix = Registry(entry_points=False).feature_matrix()
    text = format_table(matrix)
    lines = text.splitlines()
    assert lines[0] == "Components" and "Features" in lines
    # title, header, rule, rows; blank; title, header, rule, rows
    assert len(lines) == 3 + len(matrix["components"]) + 1 + 3 + len(matrix["features"])
    assert any(line.startswith("attention_backend") and " torch " in line for line in lines)


def test_cli_reports_a_broken_plugin_as_a_one_line_error(plugin_site):
    plugin_site("acme-broken", "raise RuntimeError('boom')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site.path), *sys.path])}
    result = run_cli("features", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("tokenmill: error: plugin distribution 'acme-broken'")
    warned = run_cli("features", "--json", "--plugin-errors", "warn", env=env)
    assert warned.returncode == 0
    assert "boom" in json.loads(warned.stdout)["plugin_errors"][0]


def test_attention_selection_row_ranks_the_backends_per_device():
    detail = feature(Registry(entry_points=False).feature_matrix(), "attention_backend_selection")["detail"]

    cpu, cuda = detail.split(" | ")
    assert cpu.startswith("cpu: torch (priority 0)")  # triton on CPU: slower (interpreted) or not at all
    assert cuda.startswith("cuda: triton (priority 10), torch (priority 0)")


def test_cli_says_which_backend_a_model_gets_and_why_the_others_were_passed_over(tmp_path):
    from builders import TINY_CONFIGS, make_checkpoint

    make_checkpoint(tmp_path, TINY_CONFIGS["llama-gqa-untied"])  # head size 16: the triton kernel takes none such
    result = run_cli("features", "--json", "--model", str(tmp_path), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    detail = feature(json.loads(result.stdout), "attention_backend_for_model")["detail"]
    assert "(head_size=16, float32, block_size=16 on cpu): torch (priority 0)" in detail
    assert "not chosen: triton: " in detail
    without = run_cli("features", "--json")
    assert "attention_backend_for_model" not in without.stdout


def test_quantization_row_names_the_methods_and_the_gguf_formats():
    detail = feature(Registry(entry_points=False).feature_matrix(), "quantization")["detail"]
    assert detail.startswith("gguf (") and "Q4_K" in detail and "Q6_K" in detail
    assert "fp8 (" in detail and "none (" in detail
