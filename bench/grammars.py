"""llguidance against xgrammar on this project's loop, side by side in one run.

Both libraries get the embedded model's tokenizer (as the llamacpp engine loads it) and the
JSON schemas of the structured-output e2e test. Each is driven as the batching loop drives a
`backend.structured.Constraint`: per token, the mask of one row is computed and applied to a
float32 logits row of the vocabulary's size, a token is sampled under it, and the matcher
advances, until the end-of-sequence token or `TOKEN_CAP`. llguidance runs through `Constraint`
itself; xgrammar through its CPU path (`fill_next_token_bitmask`, `apply_token_bitmask_inplace`).
A third driver applies llguidance's mask with xgrammar's kernel, to tell the cost of llguidance's
mask from that of `Constraint`'s own apply. xgrammar is imported only here: `make bench` alone
installs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

import jsonschema
import llguidance
import llguidance.torch
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.settings import BackendSettings
from backend.structured import Constraint, GrammarTokenizer, json_grammar
from bench.report import Row, Section
from harness.json_schemas import schemas

TOKEN_CAP = 400  # the e2e test's max_tokens
LLGUIDANCE, XGRAMMAR = "llguidance", "xgrammar"
HYBRID = "llguidance's mask by xgrammar's kernel"
LIBRARIES = (LLGUIDANCE, XGRAMMAR)
DRIVERS = (*LIBRARIES, HYBRID)


class Matcher(Protocol):
    """One sequence's grammar, as the loop uses it."""

    def mask(self, logits: torch.Tensor) -> None: ...

    def advance(self, token: int) -> None: ...


Compile = Callable[[dict[str, Any]], Matcher]  # a schema to a matcher ready for its first mask


def llguidance_compiler(tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int]) -> Compile:
    """The backend's own path: `GrammarTokenizer` once, `json_grammar` and a `Constraint` each."""
    grammar_tokenizer = GrammarTokenizer(tokenizer, eos_ids).get()
    return lambda schema: Constraint(grammar_tokenizer, json_grammar(schema))


class XGrammarConstraint:
    """An xgrammar matcher with the `Constraint` interface, on xgrammar's CPU path."""

    def __init__(self, compiled: Any, vocab: int) -> None:
        import xgrammar

        self._apply = xgrammar.apply_token_bitmask_inplace
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab)

    def mask(self, logits: torch.Tensor) -> None:
        """Fill the row's bitmask and apply it (xgrammar says when every token is allowed)."""
        if self._matcher.fill_next_token_bitmask(self._bitmask):
            self._apply(logits, self._bitmask)

    def advance(self, token: int) -> None:
        """The sampled token; a refusal is a bug in the decode, as in `Constraint`."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}, which its mask allowed")


def xgrammar_compiler(tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int]) -> Compile:
    """`TokenizerInfo` and a `GrammarCompiler` once, `compile_json_schema` each, with compact
    JSON as `json_grammar` asks of llguidance; no cache, so every schema is really compiled."""
    import xgrammar

    vocab = len(tokenizer)
    info = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab, stop_token_ids=sorted(eos_ids)
    )
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile_schema(schema: dict[str, Any]) -> Matcher:
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        return XGrammarConstraint(compiled, vocab)

    return compile_schema


class HybridConstraint:
    """llguidance's matcher and bitmask (the same layout as xgrammar's), applied by xgrammar's
    CPU kernel instead of `Constraint`'s numpy unpacking and torch operations."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, vocab: int) -> None:
        import xgrammar

        self._apply = xgrammar.apply_token_bitmask_inplace
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def mask(self, logits: torch.Tensor) -> None:
        """Fill the row's bitmask with llguidance, apply it with xgrammar."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask)
        self._apply(logits, self._bitmask)

    def advance(self, token: int) -> None:
        """The sampled token; a refusal is a bug in the decode."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {self._matcher.get_error()}")


def hybrid_compiler(tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int]) -> Compile:
    """llguidance's tokenizer once, `json_grammar` and a `HybridConstraint` each."""
    grammar_tokenizer = GrammarTokenizer(tokenizer, eos_ids).get()
    vocab = len(tokenizer)
    return lambda schema: HybridConstraint(grammar_tokenizer, json_grammar(schema), vocab)


COMPILERS = {LLGUIDANCE: llguidance_compiler, XGRAMMAR: xgrammar_compiler, HYBRID: hybrid_compiler}


@dataclass
class Measured:
    """One driver's times (seconds) and outcomes over every schema."""

    setup_s: float = 0.0
    compile_s: list[float] = field(default_factory=list)
    mask_s: list[float] = field(default_factory=list)  # per token: compute and apply one row
    advance_s: list[float] = field(default_factory=list)  # per token
    ended: int = 0  # decodes the grammar ended before TOKEN_CAP
    valid: int = 0  # of those, outputs that parse and follow their schema


@dataclass(frozen=True)
class Decoded:
    """One seeded decode under a matcher, with the time of each step."""

    tokens: list[int]
    ended: bool
    mask_s: list[float]
    advance_s: list[float]


def decode(matcher: Matcher, vocab: int, eos_ids: Collection[int], seed: int) -> Decoded:
    """Sample each token from seeded random logits under the mask (Gumbel-max: softmax
    sampling at temperature 1), until an end token or the cap. The random draws do not depend
    on the mask, so equal masks give equal outputs; numpy draws them on one thread, so torch's
    thread count changes only what the matcher does."""
    rng = np.random.default_rng(seed)
    tokens: list[int] = []
    mask_s: list[float] = []
    advance_s: list[float] = []
    for _ in range(TOKEN_CAP):
        row = rng.standard_normal(vocab, dtype=np.float32)
        logits = torch.from_numpy(row)  # the same memory: the mask writes into `row`
        start = time.perf_counter()
        matcher.mask(logits)
        masked = time.perf_counter()
        token = int(np.argmax(row + rng.gumbel(size=vocab)))
        sampled = time.perf_counter()
        matcher.advance(token)  # the end token too, as the loop does
        advance_s.append(time.perf_counter() - sampled)
        mask_s.append(masked - start)
        if token in eos_ids:
            return Decoded(tokens, True, mask_s, advance_s)
        tokens.append(token)
    return Decoded(tokens, False, mask_s, advance_s)


def follows(text: str, schema: dict[str, Any]) -> bool:
    """Whether `text` is JSON that validates against `schema`."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def measure(
    tokenizer: PreTrainedTokenizerBase, eos_ids: Collection[int], all_schemas: list[dict[str, Any]]
) -> dict[str, Measured]:
    """Every driver over every schema, interleaved schema by schema (the first to run rotates),
    so that a noisy neighbour on the machine slows all alike."""
    results = {name: Measured() for name in DRIVERS}
    compilers: dict[str, Compile] = {}
    for name in DRIVERS:
        start = time.perf_counter()
        compilers[name] = COMPILERS[name](tokenizer, eos_ids)
        results[name].setup_s = time.perf_counter() - start
    vocab = len(tokenizer)
    for seed, schema in enumerate(all_schemas):
        turn = seed % len(DRIVERS)
        for name in DRIVERS[turn:] + DRIVERS[:turn]:
            start = time.perf_counter()
            matcher = compilers[name](schema)
            results[name].compile_s.append(time.perf_counter() - start)
            run = decode(matcher, vocab, eos_ids, seed)
            result = results[name]
            result.mask_s += run.mask_s
            result.advance_s += run.advance_s
            if run.ended:
                result.ended += 1
                result.valid += follows(str(tokenizer.decode(run.tokens)), schema)
    return results


def p99(values: list[float]) -> float:
    """The 99th percentile, interpolated between the two nearest values."""
    return float(np.percentile(values, 99))


def _each(
    results: dict[str, Measured], figure: Callable[[Measured], str], names: tuple[str, ...]
) -> str:
    return "; ".join(f"{name} {figure(results[name])}" for name in names)


def _per_token(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.0f} / {p99(values) * 1e6:.0f} µs"


def _compile(m: Measured) -> str:
    return f"{statistics.median(m.compile_s) * 1000:.1f} / {max(m.compile_s) * 1000:.1f} ms"


def times(ours: float, theirs: float) -> str:
    """`ours` against `theirs` (durations) in words: "2.0x faster", "1.5x slower"."""
    if ours <= theirs:
        return f"{theirs / ours:.1f}x faster"
    return f"{ours / theirs:.1f}x slower"


def rows(
    alone: dict[str, Measured], threads: int, default: dict[str, Measured], schema_count: int
) -> list[Row]:
    """The table, each cell one figure per driver: `alone` measured with torch on one thread,
    `default` (its per-token figures only) with torch on `threads`."""
    return [
        (
            "tokenizer and compiler setup, once",
            _each(alone, lambda m: f"{m.setup_s * 1000:.0f} ms", LIBRARIES),
            "",
        ),
        (
            f"compile a schema into a matcher, median / max over {schema_count}",
            _each(alone, _compile, LIBRARIES),
            "",
        ),
        (
            "compute one row's mask and apply it to a float32 logits row, per token, "
            "median / p99, torch on 1 thread",
            _each(alone, lambda m: _per_token(m.mask_s), DRIVERS),
            "",
        ),
        (
            f"... the same with torch on {threads} threads (this process's default; Ray gives "
            "the model replica one per CPU it grants)",
            _each(default, lambda m: _per_token(m.mask_s), DRIVERS),
            "",
        ),
        (
            "advance the matcher by the sampled token, per token, median / p99, torch on 1 thread",
            _each(alone, lambda m: _per_token(m.advance_s), LIBRARIES),
            "",
        ),
        ("tokens decoded", _each(alone, lambda m: str(len(m.mask_s)), DRIVERS), ""),
        (
            f"outputs the grammar ended before {TOKEN_CAP} tokens, and of them valid JSON that "
            "follows its schema",
            _each(alone, lambda m: f"{m.ended}/{schema_count}, {m.valid} valid", LIBRARIES),
            "all, both",
        ),
    ]


def _versus(results: dict[str, Measured], name: str, times_of: str) -> str:
    """`name`'s median of `times_of` against xgrammar's, in words."""
    of = attrgetter(times_of)
    return times(statistics.median(of(results[name])), statistics.median(of(results[XGRAMMAR])))


def verdict(
    alone: dict[str, Measured], threads: int, default: dict[str, Measured], schema_count: int
) -> str:
    """This run's comparison in words: medians, and the outputs that were valid."""
    compiled = _versus(alone, LLGUIDANCE, "compile_s")
    one = _versus(alone, LLGUIDANCE, "mask_s")
    many = _versus(default, LLGUIDANCE, "mask_s")
    hybrid = _versus(default, HYBRID, "mask_s")
    valid = ", ".join(f"{name} {alone[name].valid}/{schema_count}" for name in LIBRARIES)
    return (
        f"In this run, against xgrammar, llguidance compiled a schema {compiled} and masked a "
        f"row {one} with torch on 1 thread, {many} on {threads} ({hybrid} with xgrammar's "
        f"kernel applying its mask); valid outputs: {valid}."
    )


def section() -> Section:
    """Measure every driver with torch on one thread, then on its default threads."""
    tokenizer = load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)
    all_schemas = schemas()
    eos_ids = {tokenizer.eos_token_id}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = measure(tokenizer, eos_ids, all_schemas)
    finally:
        torch.set_num_threads(threads)
    default = measure(tokenizer, eos_ids, all_schemas)
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)
    return Section(
        "grammars",
        "Grammar engines: llguidance against xgrammar",
        "The project masks each constrained row with llguidance (`backend/structured.py`); "
        f"here it is measured against xgrammar ({versions}) in one process, on the embedded "
        f"model's tokenizer ({len(tokenizer)} tokens) and the {len(all_schemas)} JSON schemas "
        "of the structured-output e2e test. Each is driven as the batching loop drives a "
        "grammar: per token, one row's mask is computed and applied to a float32 logits row, a "
        "token is sampled from seeded random logits under it and the matcher advances, until "
        f"the grammar ends or {TOKEN_CAP} tokens. llguidance runs through the backend's own "
        "`Constraint`, xgrammar through its CPU path; a third driver applies llguidance's mask "
        "with xgrammar's kernel, to tell llguidance's mask from `Constraint`'s apply (numpy "
        "on the row's memory, on the calling thread alone). "
        f"{verdict(alone, threads, default, len(all_schemas))} Beside the figures: llguidance "
        "installs with no other package, where xgrammar requires triton (a GPU compiler) on "
        "Linux, which `make bench` leaves out.",
        rows(alone, threads, default, len(all_schemas)),
    )
