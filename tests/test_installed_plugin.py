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


def test_pip_installed_plugin_appears_in_features(tmp_path):
    project = tmp_path / "tokenmill-acme"
    project.mkdir()
    (project / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (project / "tokenmill_acme.py").write_text(textwrap.dedent(MODULE))
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(project)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "features", "--json"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    assert rows["echo"]["provider"] == "tokenmill-acme 0.4.1" and rows["echo"]["status"] == "available"
    refused = rows["AcmeHybridForCausalLM"]
    assert refused["status"] == "refused" and refused["provider"] == "tokenmill-acme 0.4.1"
    assert "V0 state cache" in refused["reason"]
