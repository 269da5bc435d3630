"""pytest plugin for tokenmill plugin authors: ``pytest -p tokenmill.testing``.

Fixtures:
    tokenmill_registry  a fresh ``Registry`` (built-ins + installed plugins,
                        honouring ``TOKENMILL_PLUGINS``)
    tokenmill_config    a small CPU ``EngineConfig``

Conformance suite: ``--tokenmill-conformance=PLUGIN`` (repeatable) adds one
test per contract check for every component that PLUGIN registers. PLUGIN is
an entry-point name, a distribution name, or a built-in plugin module name:

    pytest -p tokenmill.testing --tokenmill-conformance=my_plugin

Attention backends are compared with the ``torch`` reference on random paged
inputs (plain, with a sliding window, with a logits soft cap); drafters are
checked against their output bounds and determinism; guided decoders against
the accept/rollback/bitmask contract; model classes against transformers (when
it has the architecture), against their own paged-cache consistency, with GGUF
Q8_0 and fp8 weights (``quantized_weights``) and at tensor_parallel_size 2 in two
gloo processes against size 1 (``supports_tensor_parallel``).
"""
from __future__ import annotations

from collections.abc import Callable

import pytest

from ..config import EngineConfig
from ..registry import ComponentRecord, Registry
from .builders import make_attention_metadata, shuffled_block_tables
from .conformance import CHECKS

__all__ = ["CHECKS", "ConformanceItem", "make_attention_metadata", "shuffled_block_tables"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokenmill")
    group.addoption("--tokenmill-conformance", action="append", default=[], metavar="PLUGIN",
                    help="run the conformance suite on the components registered by PLUGIN "
                         "(entry-point, distribution or built-in module name); repeatable")


@pytest.fixture
def tokenmill_registry() -> Registry:
    return Registry()


@pytest.fixture
def tokenmill_config() -> EngineConfig:
    return EngineConfig.build(device="cpu", dtype="float32", max_model_len=256, block_size=16,
                              num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=256)


class ConformanceItem(pytest.Item):
    """One contract check applied to one registered component."""

    def __init__(self, *, record: ComponentRecord, check: Callable[[type], None], **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record
        self.check = check

    def runtest(self) -> None:
        self.check(self.record.cls)

    def reportinfo(self):
        return self.record.provider.describe(), None, self.name


def _refused_with_reason(cls: type) -> None:
    assert cls.v0_only_reason, f"{cls.__name__} is V0-only but gives no v0_only_reason"


def _matches(record: ComponentRecord, target: str) -> bool:
    provider = record.provider
    return target in (provider.plugin, provider.distribution)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    targets = config.getoption("tokenmill_conformance")
    if not targets:
        return
    registry = Registry()
    for target in targets:
        records = [r for r in registry.records() if _matches(r, target)]
        if not records:
            known = sorted({p.plugin for p in registry.providers} | {p.distribution for p in registry.providers
                                                                     if p.distribution})
            raise pytest.UsageError(f"--tokenmill-conformance={target}: no loaded plugin of that name "
                                    f"registered a component; loaded plugins: {known}")
        for record in records:
            checks = [_refused_with_reason] if record.status == "refused" else CHECKS[record.kind]
            for check in checks:
                name = f"conformance[{target}]::{record.kind}[{record.name}]::{check.__name__.lstrip('_')}"
                items.append(ConformanceItem.from_parent(session, name=name, nodeid=name, record=record,
                                                           check=check))
