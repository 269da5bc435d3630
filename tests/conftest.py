"""Shared builders: third-party plugin distributions made on the fly.

A fake distribution is a module plus a ``.dist-info`` folder with
``entry_points.txt``, placed on ``sys.path``: importlib.metadata finds it
exactly as it finds a pip-installed package.
"""
from __future__ import annotations

import os

import torch

# Triton picks interpreter or compiler when a kernel is defined, so the choice must be made before
# any test module (or the registry loading built-in plugins) imports tokenmill.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["tokenmill.testing"]


def write_plugin_dist(site: Path, dist: str, source: str, *, version: str = "1.0.0",
                      entry_name: str | None = None, module: str | None = None) -> str:
    """Write ``module`` (default: the dist name in snake case) and its dist-info into ``site``."""
    module = module or dist.replace("-", "_")
    entry_name = entry_name or module
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[tokenmill.plugins]\n{entry_name} = {module}\n")
    return module


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A folder on sys.path for fake plugin distributions; returns a writer."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("TOKENMILL_PLUGINS", raising=False)
    written: list[str] = []

    def add(dist: str, source: str, **kwargs) -> str:
        module = write_plugin_dist(site, dist, source, **kwargs)
        written.append(module)
        importlib.invalidate_caches()
        return module

    add.path = site
    yield add
    for module in written:
        sys.modules.pop(module, None)
