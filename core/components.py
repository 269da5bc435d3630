"""What every component has in common, and the V0-only marker.

A component is a class that a plugin hands to a registration hook. The registry
reads its class attributes (``name``, ``capabilities()``) without instantiating
it; the engine instantiates the ones the configuration selects.
"""
from __future__ import annotations

from abc import ABC
from typing import Any, ClassVar

ATTENTION_BACKEND = "attention_backend"
DRAFTER = "drafter"
GUIDED_DECODER = "guided_decoder"
MODEL = "model"
KINDS = (ATTENTION_BACKEND, DRAFTER, GUIDED_DECODER, MODEL)


class SupportsV0Only:
    """Marker for a component that only works on a V0-style engine.

    Inherit it to declare the fact; the registry then refuses the component:
    it is listed in the feature matrix as ``refused`` with ``v0_only_reason``
    and asking for it by name raises ``RefusedComponentError``.

        class MambaForCausalLM(Model, SupportsV0Only):
            architectures = ("MambaForCausalLM",)
            v0_only_reason = "Mamba state caching is V0-only"
    """

    v0_only_reason: ClassVar[str] = "declares SupportsV0Only; the V1 engine does not run it"


class Component(ABC):
    """Base of the four component kinds. Subclasses set ``kind`` and ``name``."""

    kind: ClassVar[str]
    name: ClassVar[str]

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What this component supports, for the feature matrix (JSON-serialisable)."""
        return {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names this class is registered and selected under."""
        return (cls.name,)
