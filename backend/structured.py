"""Structured output: a reply constrained to a grammar, token by token, with llguidance.

A request's `response_format` (a JSON schema, or any JSON object) becomes an llguidance grammar
when the request is validated (`json_grammar`: a schema llguidance cannot compile is the
request's 400). In the batching loop each constrained sequence owns a `Constraint`: before its
token is sampled, every token the grammar does not allow next is masked out of its logits row
(other rows are not touched), and the sampled token advances the grammar. The end-of-sequence
token is allowed only once the grammar accepts, so a reply that ends by itself always parses.

llguidance (used by llama.cpp's server and vLLM) was chosen over xgrammar (vLLM, SGLang), and
measured against it on this loop's mask (`python -m bench grammars`, in docs/benchmarks.md): it
compiles a JSON schema several times faster, its mask and our apply cost less per token, every
output of the 50 e2e schemas was valid JSON (xgrammar let a control character into one string),
and it installs alone, where xgrammar requires triton. `python -m bench structured` measures what
the mask costs the streams beside a constrained one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from backend import json_schema
from backend.errors import EngineError, InvalidRequestError

# Compact JSON: no free whitespace for a small model to wander in. `oneOf` is read as `anyOf`,
# as xgrammar (vLLM's default) reads it: pydantic writes `oneOf` for discriminated unions.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "coerce_one_of": True}


def json_grammar(
    schema: dict[str, Any] | None, param: str = "response_format", *, strict: bool = True
) -> str:
    """The grammar of JSON that follows `schema` (None: any JSON object), read strictly
    (`backend.json_schema.strict`) unless `strict` is False; a schema llguidance cannot compile
    is an `InvalidRequestError` naming `param`."""
    target = schema if schema is not None else {"type": "object"}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(json_schema.strict(target) if strict else target), defaults=JSON_OPTIONS
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"The JSON schema cannot be used: {exc}", param=param) from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"The JSON schema cannot be used: {error}", param=param)
    return grammar


class GrammarTokenizer:
    """llguidance's view of a Hugging Face tokenizer, built once on first use (it takes a
    fraction of a second) and shared by every constrained sequence."""

    def __init__(self, hf_tokenizer: Any, eos_ids: Iterable[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._eos_ids = sorted(eos_ids)
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def get(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                try:
                    self._built = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, eos_token=self._eos_ids
                    )
                except Exception as exc:
                    raise EngineError(
                        f"Structured output needs a fast Hugging Face tokenizer: {exc}"
                    ) from exc
            return self._built


class Constraint:
    """One sequence's grammar: masks its logits row, advances with each sampled token."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._start(llguidance.LLMatcher(tokenizer, grammar, log_level=0), tokenizer.vocab_size)
        self._check()

    def _start(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self._bitmask = allocate_token_bitmask(1, vocab)

    def copy(self) -> Constraint:
        """An independent matcher in the same state, without compiling the grammar again."""
        twin = Constraint.__new__(Constraint)
        twin._start(self._matcher.deep_copy(), self._vocab)
        return twin

    def mask(self, logits: torch.Tensor) -> None:
        """Set every token the grammar does not allow next to -inf (in place, one float32 row).

        In numpy, on the row's memory: numpy runs on this thread alone, where torch would
        spread this little work over its threads, and each operation would then wait for a core
        the engine is using (`python -m bench grammars` compares both)."""
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        width = min(logits.shape[-1], self._vocab)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), count=width, bitorder="little")
        row = logits.numpy()
        row[:width][bits == 0] = -np.inf
        row[width:] = -np.inf  # columns the tokenizer has no token for

    def advance(self, token: int) -> None:
        """The sampled token; it was allowed by `mask`, so this fails only on a bug."""
        self._matcher.consume_token(token)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise EngineError(f"The output grammar failed: {self._matcher.get_error()}")
