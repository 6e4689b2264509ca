"""The OpenAI API's request and response bodies, as far as specdecode serves them.

Requests are validated by pydantic; anything the server cannot honour exactly (`n` > 1,
`logprobs`, tools) is refused with a 400 rather than silently ignored. Every response carries a
`speculative_decoding` object (like vLLM's per-request speculative metrics): the target forwards,
mean tokens per forward, the acceptance histogram and the drafted and accepted counts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from specdecode.config import SamplingParams
from specdecode.engine import GenerationStats


class _Request(BaseModel):
    # Fields of the OpenAI API that change nothing here (user, presence_penalty at 0, ...) are
    # accepted and ignored; those that would change the output are refused below.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extensions of the API, as vLLM's
    ignore_eos: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None  # the final chunk carries usage anyway
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: send one request per completion")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties change the model's distribution: only 0 is supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value not in (None, False):
            raise ValueError("logprobs are not supported yet")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops) or len(stops) > 4:
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_tokens=self.max_tokens or default_max_tokens,
            seed=self.seed,
            stop=tuple(stops),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[int]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        # OpenAI's newer name for max_tokens; max_tokens wins where both are given.
        return super().sampling(self.max_completion_tokens or default_max_tokens)

    def turns(self) -> list[dict[str, str]]:
        # The chat templates know "system"; OpenAI's newer name for it is "developer".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in self.messages
        ]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def finish_reason(stats: GenerationStats) -> str:
    """OpenAI's finish reasons: "stop" at the end of text or a stop string, "length" at the
    token limit or the end of the context."""
    return "stop" if stats.stop_reason in ("eos", "stop") else "length"


def speculative_stats(stats: GenerationStats) -> dict[str, Any]:
    """The request's speculative statistics (vLLM's names where it has them)."""
    return {
        "num_target_forwards": stats.target_forwards,
        "mean_tokens_per_forward": round(stats.mean_accepted_tokens, 4),
        "acceptance_histogram": stats.acceptance_histogram,
        "num_drafts": stats.drafted_at_depth[0] if stats.drafted_at_depth else 0,
        "num_draft_tokens": stats.drafted_tokens,
        "num_accepted_tokens": stats.accepted_tokens,
        "num_accepted_tokens_per_pos": stats.accepted_at_depth,
    }


def usage(stats: GenerationStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
        "speculative_decoding": speculative_stats(stats),
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
