"""What every run of the batching loop must show, whatever features its requests combine: the
requests drawn (hypothesis strategies), the observers put around the runner and the grammar, and
the checks. Shared by the scripted-runner properties (tests/backend/replica/test_loop_properties.py)
and the real engines' (tests/backend/engines/test_engine_properties.py).

The batcher is built in `make_batcher` alone; forced preemption is a small KV token budget the
observed runner reports (`TokenBudget`), by which the loop's scheduler preempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jsonschema
import llguidance
import torch
from hypothesis import strategies as st

from backend.errors import EngineError
from backend.generation import Delta, SamplingParams
from backend.protocol import ChatCompletionRequest
from backend.replica import loop as batch_loop
from backend.replica.loop import ContinuousBatcher
from backend.replica.runner import BatchRunner, SequencesFailed
from backend.structured import Constraint, GrammarTokenizer, json_grammar
from backend.tools import RESPONSE_OPENING, ReplyReader, tools_grammar
from harness.json_schemas import schemas

# Seconds one example's requests may take before it counts as a hang.
EXAMPLE_TIMEOUT_S = 60.0
# Seconds the gauges may take to come back to zero once every stream has ended.
GAUGE_TIMEOUT_S = 5.0
FAULT = "injected fault"

# --- building the batcher -------------------------------------------------------------------


def make_batcher(
    runner: BatchRunner,
    tokenizer: Any,
    eos_ids: frozenset[int],
    *,
    token_budget: int = 512,
    stream_interval_s: float = 0.0,
    idle_token_budget: int | None = None,
) -> ContinuousBatcher:
    """The one place the tests build (and start) a batcher. Batchers of one tokenizer share its
    grammar view (building it takes a second; the loop builds it once per batcher)."""
    batcher = ContinuousBatcher(
        runner,
        tokenizer,
        eos_ids,
        token_budget=token_budget,
        stream_interval_s=stream_interval_s,
        idle_token_budget=idle_token_budget,
    )
    if id(tokenizer) not in _GRAMMAR_TOKENIZERS:
        _GRAMMAR_TOKENIZERS[id(tokenizer)] = (tokenizer, GrammarTokenizer(tokenizer, eos_ids))
    batcher._grammar_tokenizer = _GRAMMAR_TOKENIZERS[id(tokenizer)][1]
    batcher.start()
    return batcher


_GRAMMAR_TOKENIZERS: dict[int, tuple[Any, GrammarTokenizer]] = {}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Small tensors on a busy machine: one thread, not several waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TokenBudget:
    """Forced preemption: the runner reports KV cells for `tokens` tokens (`kv_tokens`), and the
    loop's scheduler preempts the youngest sequence when the running ones outgrow it (None: the
    runner's own figure). `preemptions`: sequences seen coming back after one."""

    def __init__(self, tokens: int | None) -> None:
        self.tokens = tokens
        self.preemptions = 0


# --- the runner, observed -------------------------------------------------------------------


@dataclass
class Step:
    """Logits a runner returned: after which tokens, and by which call."""

    context: tuple[int, ...]
    logits: torch.Tensor
    by: str  # "prefill" or "decode"


class ObservedRunner:
    """A `BatchRunner` around another, recording what each sequence holds and every row of
    logits returned, and checking on the way that:

    - a preempted sequence comes back with exactly its old tokens plus the one it had sampled;
    - decode gets every live sequence, once, and never one still prefilling;
    - the logits handed out are never changed (the loop must sample from a copy).

    It can preempt (`budget`) and fail one sequence at a chosen decode step (`fail_step`)."""

    def __init__(
        self,
        inner: Any,
        budget: TokenBudget | None = None,
        fail_step: int | None = None,
        keep_logits: bool = True,
    ) -> None:
        self.inner = inner
        self.chunked_prefill = inner.chunked_prefill
        self.mixed_batch = inner.mixed_batch
        self.prefix_caching = inner.prefix_caching
        self.capacity = inner.capacity
        self.budget = budget or TokenBudget(None)
        self.kv_tokens = inner.kv_tokens if self.budget.tokens is None else self.budget.tokens
        self.fail_step = fail_step
        self.failed: list[int] = []
        self.keep_logits = keep_logits
        self.held: dict[int, list[int]] = {}  # live sequences' tokens
        self.decoding: set[int] = set()
        self.ages: dict[int, int] = {}
        self.released: dict[int, list[int]] = {}  # last tokens of each released sequence
        self.steps: list[Step] = []
        self.problems: list[str] = []
        self._decodes = 0
        self._handed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (given, a copy)

    def _check_handed(self) -> None:
        for given, copy in self._handed:
            if not torch.equal(given, copy):
                self.problems.append("the loop changed logits a runner returned")
        self._handed.clear()

    def _hand(self, logits: torch.Tensor) -> torch.Tensor:
        self._handed.append((logits, logits.clone()))
        return logits

    def _record(self, seq_id: int, logits: torch.Tensor, by: str) -> None:
        if self.keep_logits:
            self.steps.append(Step(tuple(self.held[seq_id]), logits.detach().clone(), by))

    def _begin(self, seq_id: int) -> None:
        self.ages.setdefault(seq_id, len(self.ages))

    def lookup(self, prompt_ids: list[int]) -> int:
        return int(self.inner.lookup(prompt_ids))

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        self._check_handed()
        self._begin(seq_id)
        cached = int(self.inner.resume(seq_id, prompt_ids))
        if not 0 <= cached < len(prompt_ids):
            self.problems.append(f"resume kept {cached} of {len(prompt_ids)} prompt tokens")
        self.held[seq_id] = list(prompt_ids[:cached])
        return cached

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        self._check_handed()
        self._begin(seq_id)
        if seq_id in self.decoding:
            self.problems.append(f"sequence {seq_id} prefilled while decoding")
        logits = self.inner.prefill(seq_id, prompt_ids)
        self.held.setdefault(seq_id, []).extend(prompt_ids)
        self._record(seq_id, logits, "prefill")
        return self._hand(logits)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        self._check_handed()
        self._check_decode(seq_ids)
        logits = self.inner.decode(seq_ids, token_ids)
        for row, (seq_id, token) in enumerate(zip(seq_ids, token_ids, strict=True)):
            self.held[seq_id].append(token)
            self._record(seq_id, logits[row], "decode")
        return self._hand(logits)

    def step(
        self, decodes: list[tuple[int, int]], chunks: list[tuple[int, list[int], bool]]
    ) -> torch.Tensor:
        """A mixed step: `decode`'s checks for its decode tokens, `prefill`'s for its chunks."""
        self._check_handed()
        for seq_id, _, _ in chunks:
            self._begin(seq_id)
            if seq_id in self.decoding:
                self.problems.append(f"sequence {seq_id} prefilled while decoding")
        if decodes:
            self._check_decode([seq_id for seq_id, _ in decodes])
        logits = self.inner.step(decodes, chunks)
        rows = iter(logits)
        for seq_id, token in decodes:
            self.held[seq_id].append(token)
            self._record(seq_id, next(rows), "decode")
        for seq_id, chunk, last in chunks:
            self.held.setdefault(seq_id, []).extend(chunk)
            if last:
                self._record(seq_id, next(rows), "prefill")
        return self._hand(logits)

    def _check_decode(self, seq_ids: list[int]) -> None:
        """Every decoding sequence is in the step, once; a preempted one came back whole; the
        chosen step fails one sequence."""
        ids = set(seq_ids)
        if len(ids) != len(seq_ids) or not self.decoding <= ids <= set(self.held):
            self.problems.append(
                f"decode of {seq_ids}: decoding {sorted(self.decoding)}, held {sorted(self.held)}"
            )
        for seq_id in seq_ids:
            if seq_id not in self.decoding:  # its first step: a preempted one is whole again
                self.decoding.add(seq_id)
                before = self.released.get(seq_id)
                now = self.held[seq_id]
                if before is not None:
                    self.budget.preemptions += 1
                if before is not None and (len(now) != len(before) + 1 or now[:-1] != before):
                    self.problems.append(
                        f"sequence {seq_id} came back as {len(now)} tokens, not its "
                        f"{len(before)} and the one it had sampled"
                    )
        if self.fail_step is not None and self._decodes == self.fail_step and len(seq_ids) > 1:
            victim = seq_ids[-1]
            self.failed.append(victim)
            self._decodes += 1
            raise SequencesFailed(FAULT, [victim])
        self._decodes += 1

    def fork(self, parent_id: int, child_id: int) -> bool:
        self._check_handed()
        copied = bool(self.inner.fork(parent_id, child_id))
        if copied:
            self._begin(child_id)
            self.held[child_id] = list(self.held[parent_id])
        return copied

    def release(self, seq_id: int) -> None:
        self._check_handed()
        self.inner.release(seq_id)
        tokens = self.held.pop(seq_id, None)
        if tokens is not None:
            self.released[seq_id] = tokens
        self.decoding.discard(seq_id)

    def reset(self) -> None:
        self.inner.reset()
        self.held.clear()
        self.decoding.clear()

    def kv_usage(self) -> float:
        return float(self.inner.kv_usage())


# --- the grammar, observed ------------------------------------------------------------------


class ObservedConstraint:
    """A `Constraint` beside a matcher of its own on the same grammar, which checks every token
    the loop advances the constraint with: was it allowed at that point?"""

    made: list[ObservedConstraint] = []  # noqa: RUF012 - every one made while observing

    def __init__(
        self,
        tokenizer: Any,
        grammar: str,
        inner: Constraint | None = None,
        shadow: llguidance.LLMatcher | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.inner = inner if inner is not None else Constraint(tokenizer, grammar)
        self.shadow = shadow if shadow is not None else llguidance.LLMatcher(tokenizer, grammar)
        self.tokens: list[int] = []
        self.refused: list[int] = []
        self.ended = False  # the grammar took the end of sequence
        ObservedConstraint.made.append(self)

    def copy(self) -> ObservedConstraint:
        twin = ObservedConstraint(
            self.tokenizer, self.grammar, self.inner.copy(), self.shadow.deep_copy()
        )
        twin.tokens = list(self.tokens)
        return twin

    def mask(self, logits: torch.Tensor) -> None:
        self.inner.mask(logits)

    def advance(self, token: int) -> None:
        if self.shadow.is_stopped():  # the grammar is complete: only the end may follow
            allowed = token in self.tokenizer.eos_tokens
        else:
            allowed = self.shadow.validate_tokens([token]) == 1
        if not allowed:
            self.refused.append(token)
        else:
            self.shadow.consume_token(token)
            self.tokens.append(token)
            self.ended = self.shadow.is_stopped()
        self.inner.advance(token)


@contextlib.contextmanager
def observed_constraints() -> Iterator[list[ObservedConstraint]]:
    """Every constraint the loop makes meanwhile is an `ObservedConstraint`."""
    ObservedConstraint.made = []
    original = batch_loop.Constraint
    batch_loop.Constraint = ObservedConstraint  # type: ignore[misc,assignment]
    try:
        yield ObservedConstraint.made
    finally:
        batch_loop.Constraint = original  # type: ignore[misc]


# --- requests -------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ALARM = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "parameters": {
            "type": "object",
            "properties": {
                "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "loud": {"type": "boolean"},
            },
            "required": ["hour", "loud"],
            "additionalProperties": False,
        },
    },
}
TOOL_SETS = {"weather": [WEATHER], "both": [WEATHER, ALARM]}
SCHEMAS = schemas()[:12]


@dataclass(frozen=True)
class Grammar:
    """What a constrained reply must be: `schema` index, or tools (`tool_set`, `choice`)."""

    schema: int | None = None
    tool_set: str | None = None
    choice: str = "auto"


@cache
def tools_request(tool_set: str, choice: str) -> ChatCompletionRequest:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": TOOL_SETS[tool_set],
        "tool_choice": choice,
    }
    return ChatCompletionRequest.model_validate(body)


@cache
def grammar_text(grammar: Grammar) -> str:
    if grammar.schema is not None:
        return json_grammar(SCHEMAS[grammar.schema])
    assert grammar.tool_set is not None
    return tools_grammar(tools_request(grammar.tool_set, grammar.choice))


def check_reply(grammar: Grammar, text: str) -> None:
    """A reply the grammar ended follows its schema, or is the tools' reply form."""
    if grammar.schema is not None:
        jsonschema.validate(json.loads(text), SCHEMAS[grammar.schema])
        return
    assert grammar.tool_set is not None
    reader = ReplyReader("auto" if grammar.choice == "auto" else "required", "")
    reader.feed(text)
    rest, calls, reason = reader.finish("stop")
    if calls is None:  # a response: only `auto` allows one
        assert grammar.choice == "auto" and text.startswith(RESPONSE_OPENING), text
        assert isinstance(json.loads(text)["response"], str)
        return
    assert reason == "tool_calls" and rest == "" and calls, text
    functions = {t["function"]["name"]: t["function"] for t in TOOL_SETS[grammar.tool_set]}
    for call in calls:
        function: Any = functions[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), function["parameters"])


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    grammar: Grammar | None = None
    leave_after: int | None = None  # deltas the client reads before it leaves

    @property
    def deterministic(self) -> bool:
        """Its tokens depend on its logits alone (greedy, or seeded)."""
        return self.params.temperature <= 0 or self.params.seed is not None


@st.composite
def grammars(draw: st.DrawFn) -> Grammar | None:
    kind = draw(st.sampled_from(["none", "none", "json", "tools"]))
    if kind == "json":
        return Grammar(schema=draw(st.integers(0, len(SCHEMAS) - 1)))
    if kind == "tools":
        return Grammar(
            tool_set=draw(st.sampled_from(sorted(TOOL_SETS))),
            choice=draw(st.sampled_from(["auto", "required"])),
        )
    return None


STOPS = ["}", '"', "e", " the", "\n", ",", "."]


@st.composite
def requests(
    draw: st.DrawFn,
    prompt: st.SearchStrategy[list[int]],
    bias_tokens: list[int],
    max_tokens: int = 16,
    leave: bool = True,
) -> Request:
    """A request combining any of the sampling features."""
    grammar = draw(grammars())
    temperature = draw(st.sampled_from([0.0, 0.0, 0.7, 1.0, 1.5]))
    sampled = temperature > 0
    bias = draw(
        st.lists(
            st.tuples(st.sampled_from(bias_tokens), st.sampled_from([-100.0, -3.0, 3.0, 100.0])),
            max_size=3,
            unique_by=lambda pair: pair[0],
        )
    )
    params = SamplingParams(
        # A JSON reply needs room to end; a free one is cut anywhere.
        max_tokens=draw(
            st.integers(max_tokens if grammar else 1, 4 * max_tokens if grammar else max_tokens)
        ),
        temperature=temperature,
        top_p=draw(st.sampled_from([1.0, 0.9, 0.3])) if sampled else 1.0,
        stop=tuple(draw(st.lists(st.sampled_from(STOPS), max_size=2, unique=True))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**16))) if sampled else None,
        ignore_eos=draw(st.booleans()) if grammar is None else False,
        presence_penalty=draw(st.sampled_from([0.0, 0.0, 0.5, -0.5, 2.0])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.0, 0.5, 2.0])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.0, 1.3, 0.8])),
        top_k=draw(st.sampled_from([0, 0, 1, 3, 40])),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5])) if sampled else 0.0,
        logit_bias=tuple(bias),
        logprobs=draw(st.sampled_from([None, None, 0, 3])),
        grammar=None if grammar is None else grammar_text(grammar),
        n=draw(st.integers(1, 3)),
    )
    leave_after = draw(st.sampled_from([None, None, None, 1, 3])) if leave else None
    return Request(draw(prompt), params, grammar, leave_after)


# --- running ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    deltas: list[Delta] = field(default_factory=list)
    error: BaseException | None = None
    left: bool = False  # the client left before the end

    def text(self, index: int) -> str:
        return "".join(d.text for d in self.deltas if d.index == index)

    def finish(self, index: int) -> str | None:
        reasons = [d.finish_reason for d in self.deltas if d.index == index and d.finish_reason]
        return reasons[-1] if reasons else None

    def summary(self) -> list[tuple[str, str | None, int]]:
        """Per choice: text, finish reason, tokens."""
        indices = sorted({d.index for d in self.deltas})
        return [
            (self.text(i), self.finish(i), sum(d.tokens for d in self.deltas if d.index == i))
            for i in indices
        ]


async def consume(batcher: ContinuousBatcher, request: Request) -> Outcome:
    outcome = Outcome()
    try:
        async with aclosing(batcher.stream(request.prompt, request.params)) as stream:
            async for delta in stream:
                outcome.deltas.append(delta)
                if request.leave_after is not None and len(outcome.deltas) >= request.leave_after:
                    outcome.left = True
                    return outcome
    except EngineError as exc:
        outcome.error = exc
    return outcome


async def run_all(batcher: ContinuousBatcher, requests_: list[Request]) -> list[Outcome]:
    """Every request at once, through one batcher; a hang fails the example."""
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(consume(batcher, r) for r in requests_)), EXAMPLE_TIMEOUT_S
        )
    except TimeoutError as exc:
        raise AssertionError(f"the requests did not all end within {EXAMPLE_TIMEOUT_S} s") from exc


def wait_for_zero_gauges(batcher: ContinuousBatcher, runner: BatchRunner) -> None:
    """The gauges come back to zero once every stream has ended (a bounded poll)."""
    deadline = time.monotonic() + GAUGE_TIMEOUT_S
    while (batcher.occupancy(), runner.kv_usage()) != ((0, 0), 0):
        assert time.monotonic() < deadline, (
            f"gauges stuck at {batcher.occupancy()} requests, KV {runner.kv_usage()}"
        )
        time.sleep(0.01)


# --- checks -----------------------------------------------------------------------------------


def check_ends(request: Request, outcome: Outcome, faults: int) -> None:
    """Each choice of a request that ran to its end finished exactly once, within its limits."""
    if outcome.error is not None:
        assert faults and FAULT in str(outcome.error), outcome.error
        return
    finished: set[int] = set()
    tokens = dict.fromkeys(range(request.params.n), 0)
    for delta in outcome.deltas:
        assert delta.index in tokens, f"a delta of choice {delta.index} of {request.params.n}"
        assert delta.index not in finished, f"choice {delta.index} went on after its end"
        tokens[delta.index] += delta.tokens
        if delta.finish_reason is not None:
            finished.add(delta.index)
        if request.params.logprobs is not None:
            check_logprobs(delta, request.params.logprobs)
    if outcome.left:
        return
    assert finished == set(tokens), f"choices {set(tokens) - finished} never finished"
    for index, count in tokens.items():
        assert 1 <= count <= request.params.max_tokens, (index, count)
        if outcome.finish(index) == "length":
            assert count == request.params.max_tokens, (index, count)


def check_logprobs(delta: Delta, alternatives: int) -> None:
    assert len(delta.logprobs) == delta.tokens
    for entry in delta.logprobs:
        assert -float("inf") < entry.logprob <= 1e-4, entry
        assert len(entry.top) <= alternatives
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        if values:
            assert entry.logprob <= values[0] + 1e-4


def check_grammar(request: Request, outcome: Outcome, tokenizer: Any) -> None:
    """Every constrained reply, however it ended, is text its grammar allows so far; one that
    ended by its grammar's end (no stop string could cut it) follows the grammar's schema."""
    if request.grammar is None or outcome.error is not None:
        return
    for index in range(request.params.n):
        text = outcome.text(index)
        ids = tokenizer.encode(text, add_special_tokens=False)
        matcher = llguidance.LLMatcher(_llguidance_tokenizer(tokenizer), request.params.grammar)
        assert matcher.validate_tokens(ids) == len(ids), f"{text!r} leaves the grammar"
        if not outcome.left and outcome.finish(index) == "stop" and not request.params.stop:
            check_reply(request.grammar, text)


def _llguidance_tokenizer(tokenizer: Any) -> Any:
    return _GRAMMAR_TOKENIZERS[id(tokenizer)][1].get()


def check_constraints(made: list[ObservedConstraint], tokenizer: Any, by_grammar: dict) -> None:
    """No token outside the grammar was ever taken, and every reply the grammar ended follows
    its schema (stop strings or not)."""
    for constraint in made:
        assert not constraint.refused, f"tokens {constraint.refused} were outside the grammar"
        if constraint.ended:
            text = tokenizer.decode(constraint.tokens, skip_special_tokens=True)
            check_reply(by_grammar[constraint.grammar], text)
