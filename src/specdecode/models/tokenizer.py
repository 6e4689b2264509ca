"""The tokenizer: a Hugging Face `tokenizers` tokenizer plus special tokens and chat template.

Built from a `tokenizer.json` (cached from a GGUF file's vocabulary on first load, or shipped with a
Hugging Face model directory) and a small metadata dict. The chat template is rendered with a
sandboxed jinja2 environment, as transformers does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from specdecode.errors import SpecDecodeError


class Tokenizer:
    def __init__(self, tokenizer_json: str, metadata: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(tokenizer_json)
        self.eos_token_ids: frozenset[int] = frozenset(metadata.get("eos_token_ids", []))
        self.bos_token_id: int | None = metadata.get("bos_token_id")
        self.bos_token: str | None = metadata.get("bos_token")
        self.eos_token: str | None = metadata.get("eos_token")
        self.chat_template: str | None = metadata.get("chat_template")
        self.vocab_size: int = metadata.get("vocab_size") or self._tok.get_vocab_size()

    @classmethod
    def from_files(cls, tokenizer_json: Path, metadata_json: Path) -> Tokenizer:
        return cls(tokenizer_json.read_text(), json.loads(metadata_json.read_text()))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added (special) tokens and of end of sequence."""
        return frozenset(self._tok.get_added_tokens_decoder()) | self.eos_token_ids

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the vocabulary: equal fingerprints mean token ids mean the same text."""
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The underlying tokenizer as `tokenizer.json` text."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise SpecDecodeError("this model has no chat template: use --no-chat")
        return _compiled(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=None,
        )


_TEMPLATES: dict[str, object] = {}


def _compiled(source: str):
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
