"""An out-of-tree plugin package, installed with pip, shows up with its distribution name."""
import json
import os
import subprocess
import sys
import textwrap

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "tokenmill-acme"
version = "0.4.1"

[project.entry-points."tokenmill.plugins"]
acme = "tokenmill_acme"
"""

MODULE = """
from tokenmill import Drafter, Model, SupportsV0Only, hookimpl


class EchoDrafter(Drafter):
    name = "echo"

    def propose(self, token_ids, max_num_tokens):
        return [list(map(int, t[-n:])) if n else [] for t, n in zip(token_ids, max_num_tokens)]


class AcmeHybrid(Model, SupportsV0Only):
    architectures = ("AcmeHybridForCausalLM",)
    v0_only_reason = "hybrid attention/Mamba layers need the V0 state cache"


@hookimpl
def tokenmill_register_drafters(register):
    register(EchoDrafter)


@hookimpl
def tokenmill_register_models(register):
    register(AcmeHybrid)
"""


def pip_install(tmp_path, module: str, pyproject: str, source: str) -> dict[str, str]:
    """pip-install a one-module package into a folder; the environment that sees it."""
    project = tmp_path / module
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(pyproject))
    (project / f"{module}.py").write_text(textwrap.dedent(source))
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(project)], check=True, timeout=300)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path])}


def test_pip_installed_plugin_appears_in_features(tmp_path):
    env = pip_install(tmp_path, "tokenmill_acme", PYPROJECT, MODULE)
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "features", "--json"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    assert rows["echo"]["provider"] == "tokenmill-acme 0.4.1" and rows["echo"]["status"] == "available"
    refused = rows["AcmeHybridForCausalLM"]
    assert refused["status"] == "refused" and refused["provider"] == "tokenmill-acme 0.4.1"
    assert "V0 state cache" in refused["reason"]


FOUR_KINDS_PYPROJECT = PYPROJECT.replace('name = "tokenmill-acme"', 'name = "tokenmill-acme-four"').replace(
    'acme = "tokenmill_acme"', 'acme_four = "tokenmill_acme_four"')

FOUR_KINDS_MODULE = """
from pydantic import BaseModel, Field

from tokenmill import Drafter, hookimpl
from tokenmill.plugins.attention import TorchAttentionBackend
from tokenmill.plugins.models.llama import LlamaForCausalLM
from tokenmill.plugins.structured import XGrammarDecoder


class RepeatLastDrafter(Drafter):
    name = "acme-repeat"

    class Options(BaseModel):
        max_repeat: int = Field(default=2, ge=1)

    def propose(self, token_ids, max_num_tokens):
        return [[int(t[-1])] * min(n, self.options.max_repeat) for t, n in zip(token_ids, max_num_tokens)]


class LabelledDecoder(XGrammarDecoder):
    name = "acme-xgrammar"

    class Options(BaseModel):
        label: str = "plain"


class TaggedTorchBackend(TorchAttentionBackend):
    name = "acme-torch"

    class Options(BaseModel):
        tag: str = "none"


class AcmeForCausalLM(LlamaForCausalLM):
    architectures = ("AcmeForCausalLM",)


@hookimpl
def tokenmill_register_drafters(register):
    register(RepeatLastDrafter)


@hookimpl
def tokenmill_register_guided_decoders(register):
    register(LabelledDecoder)


@hookimpl
def tokenmill_register_attention_backends(register):
    register(TaggedTorchBackend)


@hookimpl
def tokenmill_register_models(register):
    register(AcmeForCausalLM)
"""

RUN_FOUR_KINDS = """
import json, sys
from tokenmill import LLM, SamplingParams, StructuredOutputsParams

llm = LLM(sys.argv[1], dtype="float32", device="cpu", max_model_len=128, num_gpu_blocks_override=64,
          attention_backend="acme-torch", attention_config={"tag": "pip"},
          speculative_config={"method": "acme-repeat", "num_speculative_tokens": 2, "max_repeat": 1},
          structured_outputs_config={"backend": "acme-xgrammar", "label": "pip"})
guided = SamplingParams(max_tokens=8, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
text = llm.generate(["cat dog"], guided, use_tqdm=False)[0].outputs[0].text
core = llm.engine.core
print(json.dumps({"model": type(core.model).__name__, "attention": [type(core.model.attention).__name__,
                  core.model.attention.options.tag], "drafter": [type(core.drafter).__name__,
                  core.drafter.options.max_repeat], "decoder": [type(core.structured.decoder).__name__,
                  core.structured.decoder.options.label], "text": text,
                  "drafted": llm.get_stats()["spec_num_draft_tokens"]}))
"""


def test_a_pip_installed_package_provides_all_four_kinds_selected_by_config_alone(tmp_path):
    from builders import make_byte_level_checkpoint

    env = pip_install(tmp_path, "tokenmill_acme_four", FOUR_KINDS_PYPROJECT, FOUR_KINDS_MODULE)
    model = tmp_path / "model"
    make_byte_level_checkpoint(model, seed=2)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["AcmeForCausalLM"]}))

    result = subprocess.run([sys.executable, "-c", RUN_FOUR_KINDS, str(model)], capture_output=True, text=True,
                            env=env, timeout=300)

    assert result.returncode == 0, result.stderr
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    assert ran["model"] == "AcmeForCausalLM"
    assert ran["attention"] == ["TaggedTorchBackend", "pip"] and ran["drafter"] == ["RepeatLastDrafter", 1]
    assert ran["decoder"] == ["LabelledDecoder", "pip"] and ran["text"] in ("yes", "no")
    assert ran["drafted"] > 0
