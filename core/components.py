"""What every component has in common, and the V0-only marker.

A component is a class that a plugin hands to a registration hook. The registry
reads its class attributes (``name``, ``capabilities()``) without instantiating
it; the engine instantiates the ones the configuration selects.
"""
from __future__ import annotations

from abc import ABC
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

ATTENTION_BACKEND = "attention_backend"
DRAFTER = "drafter"
GUIDED_DECODER = "guided_decoder"
MODEL = "model"
REASONING_PARSER = "reasoning_parser"
TOOL_PARSER = "tool_parser"
KINDS = (ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, MODEL, TOOL_PARSER, REASONING_PARSER)


class SupportsV0Only:
    """Marker for a component that only works on a V0-style engine.

    Inherit it to declare the fact; the registry then refuses the component:
    it is listed in the feature matrix as ``refused`` with ``v0_only_reason``
    and asking for it by name raises ``RefusedComponentError``.

        class MambaForCausalLM(Model, SupportsV0Only):
            architectures = ("MambaForCausalLM",)
            v0_only_reason = "Mamba state caching is V0-only"
    """

    v0_only_reason: ClassVar[str] = "it needs engine support that only a V0-style engine had"


class Component(ABC):
    """Base of the component kinds (``KINDS``). Subclasses set ``kind`` and ``name``.

    A component's own options are a nested pydantic model named ``Options``; the keys of
    its config section that core does not own (``speculative_config={"method": ...,
    "num_speculative_tokens": ..., **options}``) are validated by it, and the instance is
    ``self.options`` (None for a class that declares no ``Options``). A subclass that
    overrides ``__init__`` passes ``options`` on to this one.
    """

    kind: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type[BaseModel] | None] = None

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None) -> None:
        self.options = options if isinstance(options, BaseModel) else self.validate_options(options)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any] | None, section: str | None = None) -> BaseModel | None:
        """The ``Options`` instance for ``options``; a ConfigError naming the key (as
        ``section.key``) and this component for an unknown key or a bad value."""
        options = dict(options or {})
        where = f"{section}." if section else ""
        if cls.Options is None:
            if options:
                raise ConfigError(f"{where}{next(iter(options))}: {cls.kind} '{cls.names()[0]}' takes no options")
            return None
        known = {info.alias or name for name, info in cls.Options.model_fields.items()}
        unknown = [key for key in options if key not in known]
        if unknown:
            raise ConfigError(f"{where}{unknown[0]}: unknown option for {cls.kind} '{cls.names()[0]}'; its options are "
                              f"{sorted(known)}")
        try:
            return cls.Options.model_validate(options)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = ".".join(str(part) for part in error["loc"])
                place = f"{where}{key}" if key else section
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{place}: {message}" if place else message)
            raise ConfigError(f"{cls.kind} '{cls.names()[0]}': " + "; ".join(problems)) from None

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What this component supports, for the feature matrix (JSON-serialisable)."""
        return {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names this class is registered and selected under."""
        return (cls.name,)
