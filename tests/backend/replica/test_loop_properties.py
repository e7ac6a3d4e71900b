"""Properties of the batching loop over any mix of requests (hypothesis), on a scripted runner
whose logits depend on a sequence's tokens alone: grammars (none, a JSON schema, tools), logit
bias, penalties, top-k / top-p / min-p, greedy and seeded sampling, log-probabilities, `n`, stop
strings, prefix caching, chunked prefill, preemption, a failing sequence and clients that leave.

Because the scripted runner is batch-invariant, a deterministic request (greedy, or seeded) must
say exactly what it says alone, preempted or not."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from backend.engines.embedded import embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.engines.prefix_store import common_prefix
from backend.settings import BackendSettings
from tests.backend.replica.loop_properties import (
    ObservedRunner,
    Request,
    TokenBudget,
    check_constraints,
    check_ends,
    check_grammar,
    grammar_text,
    make_batcher,
    observed_constraints,
    requests,
    run_all,
    torch_threads,
    wait_for_zero_gauges,
)

# Strings whose tokens the scripted model favours: JSON's punctuation, short values, the stop
# strings, so that constrained replies often end (and free ones sometimes stop) in a few tokens.
FAVOURED = ['{"', "}", "]", '"', ",", ":", "1", "2", "true", "a", "e", " the", ".", "\n"]


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Any]:
    with torch_threads(1):
        yield load_gguf_tokenizer(embedded_gguf_path(), BackendSettings().cache_dir)


class ScriptedRunner:
    """Logits drawn from a generator seeded by the sequence's tokens (prompt and output), so
    the same tokens give the same logits in any batch; favoured tokens get a head start."""

    chunked_prefill: ClassVar[bool] = True
    mixed_batch: ClassVar[bool] = True  # `step`: decode tokens and prompt chunks together
    kv_tokens: int | None = None

    def __init__(
        self,
        vocab: int,
        favoured: list[int],
        capacity: int,
        prefix_caching: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.vocab = vocab
        self.favoured = torch.tensor(favoured)
        self.capacity = capacity
        self.prefix_caching = prefix_caching
        self.dtype = dtype
        self.live: dict[int, list[int]] = {}
        self.parked: list[list[int]] = []

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        seed = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())
        row = torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed)) * 3
        row[self.favoured] += 12
        return row.to(self.dtype)

    def lookup(self, prompt_ids: list[int]) -> int:
        shared = max((common_prefix(p, prompt_ids) for p in self.parked), default=0)
        return min(shared, len(prompt_ids) - 1)

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        self.live[seq_id] = prompt_ids[: self.lookup(prompt_ids)]
        return len(self.live[seq_id])

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        self.live.setdefault(seq_id, []).extend(prompt_ids)
        return self._logits(self.live[seq_id])

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            self.live[seq_id].append(token)
        return torch.stack([self._logits(self.live[s]) for s in seq_ids])

    def step(
        self, decodes: list[tuple[int, int]], chunks: list[tuple[int, list[int], bool]]
    ) -> torch.Tensor:
        rows = [self.decode([seq_id], [token])[0] for seq_id, token in decodes]
        for seq_id, chunk, last in chunks:
            logits = self.prefill(seq_id, chunk)
            if last:
                rows.append(logits)
        return torch.stack(rows) if rows else torch.empty(0, self.vocab, dtype=self.dtype)

    def fork(self, parent_id: int, child_id: int) -> bool:
        self.live[child_id] = list(self.live[parent_id])
        return True

    def release(self, seq_id: int) -> None:
        tokens = self.live.pop(seq_id, None)
        if tokens and self.prefix_caching:
            self.parked = [tokens, *self.parked][:4]

    def reset(self) -> None:
        self.live.clear()

    def kv_usage(self) -> float:
        return sum(len(t) for t in self.live.values()) / (self.capacity * 256)


class WholePromptRunner(ScriptedRunner):
    chunked_prefill: ClassVar[bool] = False
    mixed_batch: ClassVar[bool] = False


@dataclass
class Scenario:
    requests: list[Request]
    capacity: int
    chunked: bool
    prefix_caching: bool
    dtype: torch.dtype
    budget: int | None  # tokens before the youngest sequence is preempted
    fail_step: int | None  # the decode step at which one sequence fails
    token_budget: int  # at least the capacity, as the settings require
    idle_token_budget: int | None  # steps without a decode token (llamacpp's own: its batch)
    stream_interval_s: float

    def __repr__(self) -> str:  # hypothesis prints the failing example with it
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "requests")
        return f"Scenario({fields},\n  requests={self.requests!r})"


def favoured_ids(tokenizer: Any) -> list[int]:
    ids = {t for s in FAVOURED for t in tokenizer.encode(s, add_special_tokens=False)}
    return sorted(ids | {tokenizer.eos_token_id})


@st.composite
def scenarios(draw: st.DrawFn, favoured: list[int], vocab: int) -> Scenario:
    prompt = st.lists(st.integers(1, vocab - 1), min_size=1, max_size=12)
    bias_tokens = [*favoured, 7, 1000, 30000]
    return Scenario(
        requests=draw(st.lists(requests(prompt, bias_tokens), min_size=1, max_size=4)),
        capacity=draw(st.integers(1, 4)),
        chunked=draw(st.booleans()),
        prefix_caching=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        budget=draw(st.one_of(st.none(), st.integers(4, 40))),
        fail_step=draw(st.one_of(st.none(), st.none(), st.integers(0, 6))),
        token_budget=draw(st.sampled_from([4, 16, 512])),
        idle_token_budget=draw(st.sampled_from([None, 64])),
        stream_interval_s=draw(st.sampled_from([0.0, 0.0, 0.003])),
    )


def scripted(tokenizer: Any, scenario: Scenario, capacity: int | None = None) -> ScriptedRunner:
    kind = ScriptedRunner if scenario.chunked else WholePromptRunner
    return kind(
        len(tokenizer),
        favoured_ids(tokenizer),
        capacity or scenario.capacity,
        scenario.prefix_caching,
        scenario.dtype,
    )


def run(
    tokenizer: Any, scenario: Scenario, requests_: list[Request], reference: bool = False
) -> tuple[ObservedRunner, list[Any]]:
    """The requests through one batcher; for a `reference`, with room for all, no preemption
    and no fault."""
    runner = ObservedRunner(
        scripted(tokenizer, scenario, 4 if reference else None),
        TokenBudget(None if reference else scenario.budget),
        None if reference else scenario.fail_step,
        keep_logits=False,
    )
    batcher = make_batcher(
        runner,
        tokenizer,
        frozenset({tokenizer.eos_token_id}),
        token_budget=scenario.token_budget,
        stream_interval_s=scenario.stream_interval_s,
        idle_token_budget=scenario.idle_token_budget,
    )
    try:
        outcomes = asyncio.run(run_all(batcher, requests_))
        wait_for_zero_gauges(batcher, runner)
        assert runner.held == {}, f"sequences {sorted(runner.held)} were never released"
    finally:
        batcher.shutdown()
    assert runner.problems == []
    return runner, outcomes


SCRIPTED = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    # An example is a few hundred scripted steps of a 49k vocabulary: slower than hypothesis
    # expects of a unit test, and meant to be.
    suppress_health_check=[HealthCheck.too_slow],
)


def test_any_mix_of_requests_ends_once_follows_its_grammar_and_frees_everything(
    tokenizer: Any,
) -> None:
    favoured = favoured_ids(tokenizer)

    @SCRIPTED
    @given(scenarios(favoured, len(tokenizer)))
    def check(scenario: Scenario) -> None:
        note(repr(scenario))
        with observed_constraints() as made:
            runner, outcomes = run(tokenizer, scenario, scenario.requests)
            grammars = {grammar_text(r.grammar): r.grammar for r in scenario.requests if r.grammar}
            faults = len(runner.failed)
            assert sum(o.error is not None for o in outcomes) <= faults
            for request, outcome in zip(scenario.requests, outcomes, strict=True):
                check_ends(request, outcome, faults)
                check_grammar(request, outcome, tokenizer)
            check_constraints(made, tokenizer, grammars)
            # Deterministic requests that ran to their end say what they say alone.
            for request, outcome in zip(scenario.requests, outcomes, strict=True):
                if request.deterministic and outcome.error is None and not outcome.left:
                    alone_request = replace(request, leave_after=None)
                    _, [alone] = run(tokenizer, scenario, [alone_request], reference=True)
                    assert outcome.summary() == alone.summary(), request.params

    check()
