"""The speculative-decoding drafter contract."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .components import DRAFTER, Component

if TYPE_CHECKING:
    from .config import SpeculativeConfig


class Drafter(Component):
    """Proposes draft tokens that the target model verifies in one forward pass.

    Selected by ``speculative_config={"method": <name>, ...}``. The engine calls
    ``propose`` once per step for the requests that may take drafts.
    """

    kind = DRAFTER

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

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
        """
