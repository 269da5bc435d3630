"""The speculative-decoding drafter contract."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from .components import DRAFTER, Component


@dataclass(slots=True)
class DraftContext:
    """What a drafter that sets ``uses_hidden_states`` gets besides token ids, one entry per
    request in ``propose``'s order: the target model's hidden states (what its
    ``compute_logits`` takes) at the positions verified this step, ``[n, hidden_size]``, the
    last row being the one that produced the request's newest token. A draft model or an
    EAGLE head starts from them."""

    hidden_states: list[torch.Tensor]
    device: torch.device


class Drafter(Component):
    """Proposes draft tokens that the target model verifies in one forward pass.

    Selected by ``speculative_config={"method": <name>, "num_speculative_tokens": k,
    **options}``: the options go to the class's ``Options`` model. The engine calls
    ``propose`` once per step for the requests that may take drafts.
    """

    kind = DRAFTER
    uses_hidden_states: ClassVar[bool] = False  # True: propose() also gets a DraftContext

    def __init__(self, options: BaseModel | Mapping[str, Any] | None = None, *,
                 num_speculative_tokens: int = 1) -> None:
        super().__init__(options)
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.num_speculative_tokens = num_speculative_tokens

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"method": cls.name}

    @abstractmethod
    def propose(self, token_ids: Sequence[Sequence[int]],
                max_num_tokens: Sequence[int]) -> list[list[int]]:
        """Draft tokens for each request.

        token_ids[i]: request i's tokens so far (prompt + output), a 1-D int
        sequence (list or numpy array). max_num_tokens[i]: the most it may
        propose (0 means none). Returns one list of draft token ids per
        request, each at most ``max_num_tokens[i]`` long, possibly empty.
        A class with ``uses_hidden_states = True`` is called with a third
        argument, a ``DraftContext``.
        """
