"""What Medusa-style drafters share: heads on the target's last hidden state.

After each verification the last row of the verification's hidden states (the last accepted
node's, or the root's) is the state at the last token the target ran; the token after it is the
one just committed, the root of the next tree. At `begin` it is the prompt's last state but one
(prefill runs every prompt token but the last, which is the first root). The state is kept
before the final norm (`Backend.final_norm` applies it), as the capture gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from specdecode.backends.base import Backend
from specdecode.config import SamplingParams
from specdecode.drafters.base import NO_TARGET_OUTPUT, Drafter, DrafterResources, TargetOutput
from specdecode.errors import SpecDecodeError
from specdecode.heads import head_dir, loaded
from specdecode.heads.checkpoint import refuse_family
from specdecode.trees import TreeShape
from specdecode.verify.base import Verdict


class LastStateDrafter(Drafter):
    """A drafter whose heads read the target's final-normed last-layer state (subclasses name
    themselves and draft)."""

    samples_drafts = True
    supports_trees = True
    #: The heads' weights file, inside the head folder.
    weights_file: str = ""

    def __init__(self, heads: torch.nn.Module, target: Backend, tree: TreeShape | None) -> None:
        config = target.model_config
        assert config is not None
        self.heads = heads
        self.target = target
        self.tree = tree
        self.hidden_layers = (config.num_layers,)
        self.vocab_size = target.vocab_size
        self.target_ids = heads.target_ids.cpu()  # [draft_vocab]; drafts are chosen on the CPU
        self.sampling = SamplingParams()
        self.rng: torch.Generator | None = None
        self._state: torch.Tensor | None = None  # [H] the last-layer state at the last token run

    @classmethod
    def read_heads(cls, directory: Path, config, dtype: torch.dtype, device) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def create(cls, options: dict[str, Any], resources: DrafterResources) -> Drafter:
        unknown = set(options) - {"head"}
        if unknown:
            raise SpecDecodeError(
                f"the {cls.name!r} drafter takes only head, got {sorted(unknown)}"
            )
        target = resources.target
        config = target.model_config
        if config is None or not target.supports_hidden_states:
            raise SpecDecodeError(target.hidden_states_refusal)
        refuse_family(config)
        directory = head_dir(options.get("head"), resources.model_name, cls.name)
        table = target.token_embeddings(torch.zeros(1, dtype=torch.long))  # its dtype and device
        load: Callable[[], torch.nn.Module] = lambda: cls.read_heads(  # noqa: E731
            directory, config, table.dtype, table.device
        )
        heads = loaded(directory / cls.weights_file, (config, table.dtype, table.device), load)
        return cls(heads, target, resources.tree)

    def reset(self) -> None:
        self._state = None

    def begin(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        rng: torch.Generator | None,
        target: TargetOutput = NO_TARGET_OUTPUT,
    ) -> None:
        self.sampling = sampling
        self.rng = rng
        self._state = None
        if len(prompt) > 1:
            if target.hidden is None or target.hidden.shape[0] != len(prompt) - 1:
                raise RuntimeError(f"the {self.name} drafter needs the prompt's hidden states")
            self._state = target.hidden[-1, 0]

    def update(self, verdict: Verdict, target: TargetOutput = NO_TARGET_OUTPUT) -> None:
        if target.hidden is None:
            raise RuntimeError(f"the {self.name} drafter needs the verification's hidden states")
        last = verdict.path[-1] + 1 if verdict.path else 0  # the last accepted node, or the root
        self._state = target.hidden[last, 0]

    def normed_state(self) -> torch.Tensor:  # [1, H] in the heads' dtype and device
        assert self._state is not None
        weight = next(self.heads.parameters())
        return self.target.final_norm(self._state[None]).to(weight.device, weight.dtype)

    def full_vocab(self, draft_values: torch.Tensor, fill: float) -> torch.Tensor:
        """[..., draft_vocab] -> [..., V]: each draft id's value at its target id."""
        out = torch.full((*draft_values.shape[:-1], self.vocab_size), fill)
        out[..., self.target_ids] = draft_values.float().cpu()
        return out
