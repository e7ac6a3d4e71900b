"""`LlamaCppRunner`: the `BatchRunner` of the `llamacpp` engine, over llama.cpp's low-level API.

One llama.cpp context holds `n_seq_max` sequences, each in its own KV stream (`kv_unified` off:
a sequence attends over its own cells only, and always has `n_ctx_seq` of them). Every step of the
loop's plan is one `llama_batch`, as in `update_slots` of llama.cpp's server
(tools/server/server-context.cpp): the sampled token of every decoding sequence and the planned
prompt chunks, each token under its own sequence id and position, logits asked only for the
decode tokens and for the last token of a prompt that is all in. One `llama_decode` takes them
all, so running streams move while prompts arrive. Across KV streams llama.cpp computes a batch
as ubatches of consecutive sequence ids with as many tokens each (`split_equal`): the batch goes
in slot order, as the server's does, so decode tokens share one pass over the weights. The loop's
sequence ids grow without end, llama.cpp's must stay below `n_seq_max`: a `SlotTable` maps one to
the other.

Prefix caching follows llama.cpp's own server (tools/server, ggml-org/llama.cpp): a released
slot keeps its KV and the tokens it holds; a new request takes the idle slot sharing the longest
token prefix with its prompt, else the least recently used one (`get_available_slot`), cuts what
differs with `llama_memory_seq_rm(seq, n_past, -1)` and prefills the rest (`cache_prompt`). Before
a slot's conversation is replaced, its state is copied to host memory
(`llama_state_seq_get_data`, the server's RAM prompt cache) and restored into a slot
(`llama_state_seq_set_data`) when a later prompt matches it better than any slot does.

A request for n > 1 choices `fork`s its first choice's prefilled prompt into the others' slots
with llama.cpp's on-device sequence copy (`LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`): the parent's used
cells are copied once into a buffer llama.cpp keeps for that sequence, and from there into each
child, all inside the calls (nothing serialised to host memory, nothing left pending).

ctypes releases the GIL during every llama.cpp call, so the event loop keeps running meanwhile.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

try:
    import llama_cpp as llama
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "The llamacpp engine needs llama-cpp-python: run `make install` "
        "(or `pip install 'llama-cpp-python==0.3.36'`)."
    ) from exc

from backend.engines.prefix_store import Parked, PrefixStore, common_prefix
from backend.engines.slots import Slot, SlotTable
from backend.errors import EngineError
from backend.replica.runner import SequencesFailed

logger = logging.getLogger(__name__)
_llama_log = logging.getLogger("llama.cpp")

# llama.cpp's n_ubatch, and the least n_batch: tokens one llama_decode call takes (n_batch; the
# loop's per-step token budget, LLM_MAX_NUM_BATCHED_TOKENS, if larger) and computes at once
# (n_ubatch: llama.cpp splits a larger batch). A longer `prefill` goes in several calls.
N_BATCH = 512
# A slot is picked for what it shares only above this fraction of the new prompt, else the least
# recently used one is (the server's `slot_prompt_similarity`, default 0.1).
_MIN_SIMILARITY = 0.1
# The server copies a slot to host memory when it keeps less than half of it; here, whenever
# more than a re-tokenized tail is cut, so chats that share a long system prompt are not lost to
# each other. (A follow-up turn re-tokenizes the previous reply, which may differ from the
# generated tokens near its end: cutting that much is the slot's own conversation going on.)
_REWORDED_TAIL = 8
# `llama_state_seq_*_ext` flag: the KV data goes to (and comes from) a buffer llama.cpp keeps per
# source sequence on the KV's own device (llama_context::mem_storage, llama-context.cpp); only a
# few bytes of cell metadata come to host memory.
_ON_DEVICE = llama.LLAMA_STATE_SEQ_FLAGS_ON_DEVICE
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 5 cont


@llama.llama_log_callback
def _log_to_python(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log, warnings and errors only, through Python logging (not raw stderr)."""
    if level in _LOG_LEVELS:
        _llama_log.log(_LOG_LEVELS[level], "%s", text.decode("utf-8", "replace").rstrip())


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama.llama_log_set(_log_to_python, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


def single_token_threads(threads: int) -> int:
    """Threads for a batch of one token (llama.cpp's `n_threads`; larger batches take
    `n_threads_batch`: llama_context::graph_compute, `ubatch.n_tokens > 1`): one fewer, so a
    lone stream's step leaves a core to the processes that carry its token to the client (Ray's
    ingress and proxy); a batch of several streams takes them all."""
    return max(1, threads - 1)


def _has_amx_kernels() -> bool:
    """Whether this llama.cpp build has ggml's AMX kernels (a native build on an Intel CPU with
    AMX, e.g. Sapphire Rapids: AWS m7i, c7i)."""
    return b"AMX_INT8 = 1" in llama.llama_print_system_info()


def model_params() -> llama.llama_model_params:
    """How every GGUF is loaded: on the CPU, and never into ggml's AMX buffers.

    ggml's AMX matrix multiplication segfaults on the first decode (seen here with SmolLM2 Q4_1
    on a Xeon with AMX; llama.cpp issue 20824, closed unfixed). AMX is one of llama.cpp's "extra
    buffer types", so builds that have it load weights without them (which also skips the
    CPU repacking of Q4_0/Q4_K weights); other builds keep them.
    """
    params = llama.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = not _has_amx_kernels()
    return params


class LlamaModel:
    """A GGUF file loaded by llama.cpp (weights memory-mapped), and its vocabulary."""

    def __init__(self, path: Path) -> None:
        _init_backend()
        handle = llama.llama_model_load_from_file(str(path).encode(), model_params())
        if not handle:
            raise EngineError(f"llama.cpp could not load {path} (is it a GGUF model file?).")
        self.handle = handle
        self.path = path
        self.vocab = llama.llama_model_get_vocab(handle)
        self.n_vocab = int(llama.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama.llama_model_n_ctx_train(handle))

    def eos_ids(self) -> frozenset[int]:
        """Every token llama.cpp ends generation on (EOS, EOT and the model's other EOG tokens)."""
        return frozenset(t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(self.vocab, t))

    def token_text(self, token: int) -> str:
        """A token's text in the GGUF vocabulary (special tokens as written, e.g. `<|im_end|>`)."""
        return llama.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def close(self) -> None:
        """Free the model."""
        if self.handle:
            llama.llama_model_free(self.handle)
            self.handle = None


class LlamaCppRunner:
    """`BatchRunner` over one llama.cpp context with one KV stream per sequence."""

    # The loop may prefill a prompt in consecutive chunks: positions continue in the same stream.
    chunked_prefill: ClassVar[bool] = True
    mixed_batch: ClassVar[bool] = True  # `step`: decode tokens and prompt chunks in one batch
    kv_tokens: int | None = None  # every sequence has a stream of `n_ctx_seq` cells of its own

    def __init__(
        self,
        model: LlamaModel,
        n_seq_max: int,
        n_ctx_seq: int,
        n_threads: int,
        prefix_caching: bool = True,
        host_cache_bytes: int = 0,
        step_tokens: int = N_BATCH,
    ) -> None:
        self._model = model
        self.prefix_caching = prefix_caching
        params = llama.llama_context_default_params()
        params.n_seq_max = n_seq_max
        params.kv_unified = False  # own stream per sequence: its cells, its attention
        params.n_ctx = n_ctx_seq * n_seq_max  # llama.cpp rounds each stream up to 256 cells
        params.n_batch = max(N_BATCH, n_seq_max, step_tokens)
        params.n_ubatch = max(N_BATCH, n_seq_max)
        params.n_threads_batch = n_threads
        params.n_threads = single_token_threads(n_threads)
        params.no_perf = True
        ctx = llama.llama_init_from_model(model.handle, params)
        if not ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {n_seq_max} x {n_ctx_seq} tokens: "
                "lower LLM_MAX_BATCH_SIZE, LLM_MAX_CONTEXT_LEN or LLM_KV_CACHE_GIB."
            )
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self.capacity = int(llama.llama_n_seq_max(ctx))
        self.n_ctx_seq = int(llama.llama_n_ctx_seq(ctx))
        self.slots = SlotTable(self.capacity)  # llama.cpp's sequence id = the slot's index
        self._batch_tokens = int(params.n_batch)
        self._batch = llama.llama_batch_init(self._batch_tokens, 0, 1)
        # numpy views of the batch's arrays; seq_id is an array of pointers, written per token.
        shape = (self._batch_tokens,)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=shape)
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=shape)
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=shape)
        self._outputs = np.ctypeslib.as_array(self._batch.logits, shape=shape)
        self._n_seq_id[:] = 1
        self.parked: PrefixStore[ctypes.Array[ctypes.c_uint8]] = PrefixStore(host_cache_bytes)
        # The last on-device copy of a parent (see `fork`): its slot, the tokens it then held, and
        # the cell metadata llama.cpp returned; None once that slot's KV may have changed.
        self._staged: tuple[int, int, ctypes.Array[ctypes.c_uint8]] | None = None
        self.reset()

    @property
    def n_threads(self) -> int:
        """Threads llama.cpp computes a batch of several tokens with."""
        return int(llama.llama_n_threads_batch(self._ctx))

    def reset(self) -> None:
        """Forget every sequence: all KV memory cleared (host copies stay valid and are kept)."""
        llama.llama_memory_clear(self._memory, False)
        self.slots.clear()
        self._staged = None

    def lookup(self, prompt_ids: list[int]) -> int:
        """The prompt tokens `resume` would keep: the best of an idle slot's and a host copy's."""
        if not self.prefix_caching or not prompt_ids:
            return 0
        _, shared = self._pick_slot(prompt_ids)
        stored, _ = self.parked.best(prompt_ids)
        return min(max(shared, stored), len(prompt_ids) - 1)

    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Give the sequence the slot (or host copy) sharing the longest prefix with its prompt;
        cut what differs; return the prompt tokens it already holds (< len(prompt_ids))."""
        slot, shared = self._pick_slot(prompt_ids)
        stored, entry = self.parked.best(prompt_ids)
        if entry is not None and stored > shared:
            self._save(slot)  # (`entry` stays loadable even if this copy pushes it out)
            shared = stored if self._restore(slot, entry) else 0
        elif len(slot.tokens) - shared > _REWORDED_TAIL:  # it holds another conversation
            self._save(slot)
        keep = self._trim(slot, min(shared, len(prompt_ids) - 1))
        self.slots.lend(slot, seq_id)
        return keep

    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Put a prompt, or the next chunk of one, into the sequence; next-token logits [vocab]."""
        if not prompt_ids:
            raise EngineError("Cannot prefill an empty prompt.")
        for offset in range(0, len(prompt_ids), self._batch_tokens):
            piece = prompt_ids[offset : offset + self._batch_tokens]
            last = offset + len(piece) == len(prompt_ids)
            logits = self.step([], [(seq_id, piece, last)])
        return logits[0]

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """One token of every sequence in one batch; logits [len(seq_ids), vocab] in that order."""
        return self.step(list(zip(seq_ids, token_ids, strict=True)), [])

    def step(
        self, decodes: list[tuple[int, int]], chunks: list[tuple[int, list[int], bool]]
    ) -> torch.Tensor:
        """One `llama_batch` of every decode token and prompt chunk (`update_slots`), in slot
        order; logits of the decode tokens in the caller's order, then of each chunk that
        completes its prompt."""
        n = len(decodes) + sum(len(chunk) for _, chunk, _ in chunks)
        if n > self._batch_tokens:
            raise EngineError(f"A step of {n} tokens exceeds the batch of {self._batch_tokens}.")
        lent = self.slots.lent()
        held = {seq_id: len(slot.tokens) for seq_id, slot in lent.items()}
        wanted = [(s, 1) for s, _ in decodes] + [(s, len(chunk)) for s, chunk, _ in chunks]
        full = [s for s, more in wanted if held.get(s, 0) + more > self.n_ctx_seq]
        if full:
            raise SequencesFailed(
                f"The sequence needs more than its context window ({self.n_ctx_seq} tokens).", full
            )
        placed = [(lent[seq_id], [token], True) for seq_id, token in decodes]
        for seq_id, chunk, last in chunks:
            placed.append((lent.get(seq_id) or self._fresh_slot(seq_id), chunk, last))
        # In slot order, as the server's batch is: across KV streams llama.cpp splits a batch
        # into ubatches of consecutive sequence ids (llama_batch_allocr::split_equal,
        # `sequential`), each one more pass over the weights.
        order = sorted(range(len(placed)), key=lambda i: placed[i][0].index)
        at = 0
        for i in order:
            at = self._put(at, *placed[i])
        self._run(n)
        for slot, tokens, _ in placed:
            slot.tokens.extend(tokens)
        rows = [i for i in order if placed[i][2]]  # the caller's row of each output, batch order
        logits = self._logits(len(rows))
        return logits[np.argsort(rows)] if rows != sorted(rows) else logits

    def fork(self, parent_id: int, child_id: int) -> bool:
        """The child takes the least recently used idle slot with a copy of the parent's KV,
        complete when this returns.

        The copy stays on the KV's device (`llama_state_seq_get_data_ext` and `_set_data_ext`
        with `LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`): the get copies the parent's used cells into a
        buffer llama.cpp keeps for the parent's sequence id and returns their metadata (a few
        bytes a cell); each set copies that buffer into a child's cells. Consecutive forks of one
        parent (the n - 1 other choices of a request) share one get while the parent's KV is
        unchanged: `_staged` is dropped by every decode, reset, restore or trim of its slot.
        llama.cpp keeps that buffer until the context is freed, resized at each get: at most the
        used cells of every slot ever forked from (as much again as the KV they hold, at worst).

        Not `llama_memory_seq_cp`: across streams (`kv_unified` off) it only queues a copy of
        the whole stream (all `n_ctx_seq` cells, used or not) for the next `llama_decode`
        (llama_kv_cache::seq_cp, applied by llama_kv_cache::update), and a slot restored from
        host memory or saved to it before then would be overwritten by, or save, the wrong KV;
        llama.cpp applies pending copies only inside a decode (llama_context::memory_update)."""
        parent = self.slots.of(parent_id)
        if parent is None:
            raise EngineError(f"Sequence {parent_id} holds no slot to fork.")
        staged = self._stage(parent)
        slot = self.slots.least_recently_used()
        self._save(slot)
        self._trim(slot, 0)
        if staged is None or not llama.llama_state_seq_set_data_ext(
            self._ctx, staged, len(staged), slot.index, _ON_DEVICE
        ):
            return False  # the loop prefills the child itself
        slot.tokens = list(parent.tokens)
        self.slots.lend(slot, child_id)
        return True

    def release(self, seq_id: int) -> None:
        """The sequence is done: its slot is free, its KV stays for a later prompt (prefix
        caching) or is removed; unknown ids are ignored."""
        slot = self.slots.give_back(seq_id)
        if slot is not None and not self.prefix_caching:
            self._trim(slot, 0)

    def kv_usage(self) -> float:
        """Tokens of running sequences over every sequence's cells."""
        return self.slots.usage(self.n_ctx_seq)

    def close(self) -> None:
        """Free the batch and the context (the runner is unusable afterwards)."""
        if self._ctx:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            self._ctx = None

    def _fresh_slot(self, seq_id: int) -> Slot:
        """A sequence that was not resumed: the least recently used slot, emptied."""
        slot = self.slots.least_recently_used()
        self._trim(slot, 0)
        self.slots.lend(slot, seq_id)
        return slot

    def _put(self, at: int, slot: Slot, tokens: list[int], output: bool) -> int:
        """Write `tokens` of `slot`'s sequence into the batch from index `at`, at the positions
        after what it holds; logits of the last one if `output`. Returns the next free index."""
        end = at + len(tokens)
        self._tokens[at:end] = tokens
        self._pos[at:end] = np.arange(len(slot.tokens), len(slot.tokens) + len(tokens))
        for i in range(at, end):
            self._batch.seq_id[i][0] = slot.index
        self._outputs[at:end] = 0
        self._outputs[end - 1] = output
        return end

    def _pick_slot(self, prompt_ids: list[int]) -> tuple[Slot, int]:
        """The idle slot sharing the longest prefix with the prompt, else the least recently
        used one; and the tokens it shares."""
        idle = self.slots.idle()
        shared = [common_prefix(slot.tokens, prompt_ids) for slot in idle]
        best = max(range(len(idle)), key=lambda i: (shared[i], -idle[i].lent_at))
        if shared[best] <= _MIN_SIMILARITY * len(prompt_ids):
            lru = self.slots.least_recently_used()
            return lru, common_prefix(lru.tokens, prompt_ids)
        return idle[best], shared[best]

    def _trim(self, slot: Slot, keep: int) -> int:
        """Remove every position from `keep` on; returns what is kept (0 if llama.cpp cannot
        cut this sequence partially, in which case all of it goes, as the server does)."""
        cut = keep < len(slot.tokens) or keep == 0
        if cut and self._staged is not None and self._staged[0] == slot.index:
            self._staged = None
        if cut and not llama.llama_memory_seq_rm(self._memory, slot.index, keep, -1):
            llama.llama_memory_seq_rm(self._memory, slot.index, -1, -1)
            keep = 0
        del slot.tokens[keep:]
        return keep

    def _save(self, slot: Slot) -> None:
        """Copy what the slot holds to host memory (if the budget allows one copy of it)."""
        if not slot.tokens or self.parked.budget_bytes == 0:
            return
        if llama.llama_state_seq_get_size(self._ctx, slot.index) > self.parked.budget_bytes:
            return
        state, written = self._state(slot)
        if written:
            self.parked.put(slot.tokens, state, written)

    def _state(self, slot: Slot) -> tuple[ctypes.Array[ctypes.c_uint8], int]:
        """The slot's KV serialized into host memory, and its bytes (0 if llama.cpp failed)."""
        size = llama.llama_state_seq_get_size(self._ctx, slot.index)
        state = (ctypes.c_uint8 * size)()
        return state, int(llama.llama_state_seq_get_data(self._ctx, state, size, slot.index))

    def _stage(self, parent: Slot) -> ctypes.Array[ctypes.c_uint8] | None:
        """The parent's cells copied on device and their metadata (see `fork`), taken again
        unless the last copy is of this slot as it is now; None if llama.cpp failed."""
        if self._staged is not None and self._staged[:2] == (parent.index, len(parent.tokens)):
            return self._staged[2]
        self._staged = None
        size = llama.llama_state_seq_get_size_ext(self._ctx, parent.index, _ON_DEVICE)
        meta = (ctypes.c_uint8 * size)()
        index = parent.index
        written = llama.llama_state_seq_get_data_ext(self._ctx, meta, size, index, _ON_DEVICE)
        if not written:
            return None
        staged = (ctypes.c_uint8 * written).from_buffer(meta)
        self._staged = (parent.index, len(parent.tokens), staged)
        return staged

    def _restore(self, slot: Slot, entry: Parked[ctypes.Array[ctypes.c_uint8]]) -> bool:
        """Load a host copy into the slot instead of what it held; False if llama.cpp refused.

        The copy stays in host memory: the slot may keep only part of it. Once the slot's own
        conversation goes on and is copied back, the older copy is dropped as its prefix."""
        self.parked.touch(entry)
        self._trim(slot, 0)
        if not llama.llama_state_seq_set_data(self._ctx, entry.payload, entry.nbytes, slot.index):
            logger.warning("llama.cpp could not restore a saved sequence; prefilling it again")
            return False
        slot.tokens = list(entry.tokens)
        return True

    def _run(self, n: int) -> None:
        self._batch.n_tokens = n
        self._staged = None  # (only a parent's own cells matter; any decode may have added some)
        status = llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}.")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last decode's output rows, copied out (llama.cpp reuses the buffer)."""
        pointer = llama.llama_get_logits(self._ctx)
        view = np.ctypeslib.as_array(pointer, shape=(rows, self._model.n_vocab))
        return torch.from_numpy(view.copy())
