"""The component registry: a pluggy plugin manager plus the V1 admission rules.

Plugins are loaded in a fixed order: built-ins (a list of module names), then
the ``tokenmill.plugins`` entry-point group, filtered by the
``TOKENMILL_PLUGINS`` allowlist (comma-separated entry-point or distribution
names; unset means all, empty means none). Each plugin's hooks are called on
their own, so every component is attributed to the plugin that registered it.
A plugin's registrations land together or not at all.
"""
from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

import pluggy

from . import hookspecs
from .attention import AttentionBackend
from .components import (ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, KINDS, MODEL, REASONING_PARSER, TOOL_PARSER,
                         SupportsV0Only)
from .drafter import Drafter
from .errors import PluginLoadError, RefusedComponentError, RegistrationError, UnknownComponentError
from .model_base import Model
from .structured import GuidedDecoder
from .tool_parsing import ReasoningParser, ToolParser

BUILTIN_PLUGINS = (
    "tokenmill.plugins.attention",
    "tokenmill.plugins.spec_decode",
    "tokenmill.plugins.structured",
    "tokenmill.plugins.models",
    "tokenmill.plugins.tool_parsers",
)
ENTRY_POINT_GROUP = "tokenmill.plugins"
ALLOWLIST_ENV = "TOKENMILL_PLUGINS"

_HOOKS = {
    ATTENTION_BACKEND: ("tokenmill_register_attention_backends", AttentionBackend),
    DRAFTER: ("tokenmill_register_drafters", Drafter),
    GUIDED_DECODER: ("tokenmill_register_guided_decoders", GuidedDecoder),
    MODEL: ("tokenmill_register_models", Model),
    TOOL_PARSER: ("tokenmill_register_tool_parsers", ToolParser),
    REASONING_PARSER: ("tokenmill_register_reasoning_parsers", ReasoningParser),
}
_UNSET: Any = object()


class PluginLoadWarning(UserWarning):
    """A plugin failed to load and ``on_plugin_error="warn"`` downgraded the error."""


@dataclass(frozen=True, slots=True)
class Provider:
    """Where a component came from: a built-in module or an installed distribution."""

    plugin: str
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.distribution is None

    def __str__(self) -> str:
        return "builtin" if self.is_builtin else f"{self.distribution} {self.version}"

    def describe(self) -> str:
        if self.is_builtin:
            return f"built-in plugin '{self.plugin}'"
        return (f"plugin distribution '{self.distribution}' {self.version} "
                f"(entry point '{self.entry_point}' in group '{ENTRY_POINT_GROUP}')")


@dataclass(frozen=True, slots=True)
class ComponentRecord:
    kind: str
    name: str
    cls: type
    provider: Provider
    status: Literal["available", "refused"]
    reason: str = ""


class Registry:
    """Every component the installed plugins provide, available or refused."""

    def __init__(self, *, builtins: Iterable[str] = BUILTIN_PLUGINS, entry_points: bool = True,
                 allowlist: Iterable[str] | None = _UNSET,
                 on_plugin_error: Literal["raise", "warn"] = "raise") -> None:
        if on_plugin_error not in ("raise", "warn"):
            raise ValueError(f"on_plugin_error must be 'raise' or 'warn', got {on_plugin_error!r}")
        if allowlist is _UNSET:
            env = os.environ.get(ALLOWLIST_ENV)
            allowlist = None if env is None else [n.strip() for n in env.split(",") if n.strip()]
        self.allowlist = None if allowlist is None else frozenset(allowlist)
        self.on_plugin_error = on_plugin_error
        self.plugin_errors: list[str] = []
        self.skipped_plugins: list[str] = []
        self.providers: list[Provider] = []
        self._records: list[ComponentRecord] = []
        self._pm = pluggy.PluginManager("tokenmill")
        self._pm.add_hookspecs(hookspecs)
        for module_name in builtins:
            self._load(Provider(plugin=module_name), lambda m=module_name: importlib.import_module(m))
        if entry_points:
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = ep.dist
                provider = Provider(plugin=ep.name, distribution=dist.name if dist else "<unknown>",
                                    version=dist.version if dist else "?",
                                    entry_point=f"{ep.name} = {ep.value}")
                if self.allowlist is not None and not {ep.name, provider.distribution} & self.allowlist:
                    self.skipped_plugins.append(provider.describe())
                    continue
                self._load(provider, ep.load)

    # ------------------------------------------------------------ loading

    def _load(self, provider: Provider, load) -> None:
        try:
            plugin = load()
        except Exception as exc:
            return self._fail(provider, f"failed to import: {type(exc).__name__}: {exc}", exc)
        key = provider.describe()
        try:
            self._pm.register(plugin, name=key)
            self._pm.check_pending()
        except Exception as exc:
            self._pm.unregister(name=key) if self._pm.has_plugin(key) else None
            return self._fail(provider, f"is not a valid plugin: {exc}", exc)
        staged: list[ComponentRecord] = []
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        for kind, (hook_name, _) in _HOOKS.items():
            hook = self._pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                hook(register=lambda cls, kind=kind: staged.append(self._check(kind, cls, provider, staged)))
            except Exception as exc:
                self._pm.unregister(plugin)
                return self._fail(provider, f"raised in {hook_name}: {type(exc).__name__}: {exc}", exc)
        self._records.extend(staged)
        self.providers.append(provider)

    def _fail(self, provider: Provider, what: str, exc: Exception) -> None:
        message = f"{provider.describe()} {what}"
        if self.on_plugin_error == "raise":
            raise PluginLoadError(message) from exc
        self.plugin_errors.append(message)
        warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def _check(self, kind: str, cls: Any, provider: Provider,
               staged: list[ComponentRecord]) -> ComponentRecord:
        base = _HOOKS[kind][1]
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            raise RegistrationError(f"register() takes a subclass of tokenmill.{base.__name__}, got {cls!r}")
        if kind == MODEL:
            archs = getattr(cls, "architectures", None)
            if not (isinstance(archs, (tuple, list)) and archs and all(isinstance(a, str) and a for a in archs)):
                raise RegistrationError(f"{cls.__qualname__}.architectures must be a non-empty tuple of "
                                        f"HuggingFace architecture names, got {archs!r}")
            names = tuple(archs)
        else:
            name = getattr(cls, "name", None)
            if not (isinstance(name, str) and name):
                raise RegistrationError(f"{cls.__qualname__}.name must be a non-empty string, got {name!r}")
            names = (name,)
        if issubclass(cls, SupportsV0Only):
            record = ComponentRecord(kind, names[0], cls, provider, "refused",
                                     f"this engine does not run it (it declares SupportsV0Only): {cls.v0_only_reason}")
            return self._with_aliases(record, names, staged)
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise RegistrationError(f"{kind} {cls.__qualname__} does not implement {', '.join(missing)}")
        for name in names:
            for other in [*self._records, *staged]:
                if other.kind == kind and other.name == name and other.status == "available":
                    raise RegistrationError(
                        f"{kind} name '{name}' is registered twice: by {other.provider.describe()} "
                        f"({other.cls.__module__}.{other.cls.__qualname__}) and by {provider.describe()} "
                        f"({cls.__module__}.{cls.__qualname__})")
        return self._with_aliases(ComponentRecord(kind, names[0], cls, provider, "available"), names, staged)

    @staticmethod
    def _with_aliases(record: ComponentRecord, names: tuple[str, ...],
                      staged: list[ComponentRecord]) -> ComponentRecord:
        # A model class implementing several architectures gets one record per name.
        for alias in names[1:]:
            staged.append(ComponentRecord(record.kind, alias, record.cls, record.provider,
                                          record.status, record.reason))
        return record

    # ------------------------------------------------------------ lookup

    def records(self, kind: str | None = None) -> list[ComponentRecord]:
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        return [r for r in self._records if kind is None or r.kind == kind]

    def available(self, kind: str) -> dict[str, type]:
        return {r.name: r.cls for r in self.records(kind) if r.status == "available"}

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name``; a clear error if unknown or refused."""
        for record in self.records(kind):
            if record.name == name and record.status == "available":
                return record.cls
        for record in self.records(kind):
            if record.name == name:
                raise RefusedComponentError(
                    f"{kind} '{name}' from {record.provider.describe()} was refused: {record.reason}")
        known = sorted(self.available(kind))
        raise UnknownComponentError(f"no {kind} named '{name}'; registered: {known or 'none'}")

    def create(self, kind: str, name: str, options: Mapping[str, Any] | None = None, *,
               section: str | None = None, **context: Any) -> Any:
        """Build the component registered as ``name``: its options (the config section's keys
        that core does not own) validated by its ``Options`` (errors name ``section.key``),
        and ``context``, what the engine hands every component of the kind, as keywords."""
        cls = self.get(kind, name)
        return cls(options=cls.validate_options(options, section), **context)

    def feature_matrix(self) -> dict[str, Any]:
        from .features import feature_matrix

        return feature_matrix(self)


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
