"""The `llamacpp` engine: any local GGUF model on the CPU through llama.cpp, continuously batched.

The weights are loaded by llama.cpp as they are (memory-mapped, no conversion); prompts are
encoded by the model's Hugging Face tokenizer and chat template, read by transformers from the
same GGUF, so a conversation gives the same prompt tokens here as on the `hf` engine. Reading a
tokenizer out of a GGUF takes seconds, so the converted tokenizer (only) is cached under
`LLM_CACHE_DIR`. The batching loop, sampling and detokenizer are the shared ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.engines.base import register_engine
from backend.engines.cpus import granted_cpus
from backend.engines.embedded import EMBEDDED_MODEL_ID, embedded_gguf_path
from backend.engines.gguf_tokenizer import load_gguf_tokenizer
from backend.engines.kv_budget import GIB, check_fits, kv_budget_bytes, machine_memory_bytes
from backend.engines.llamacpp_runner import (
    N_BATCH,
    LlamaCppRunner,
    LlamaModel,
    llama,
)
from backend.engines.runner_engine import LoadedModel, RunnerEngine, context_window
from backend.errors import EngineError
from backend.settings import BackendSettings

logger = logging.getLogger(__name__)

_KV_BYTES = 2  # llama.cpp's default KV cache type is f16
_KV_BLOCK = 256  # llama.cpp pads each sequence's KV stream to a multiple of this many cells


@register_engine
class LlamaCppEngine(RunnerEngine):
    """llama.cpp on the CPU; `LLM_MODEL` names a GGUF file, empty = the embedded SmolLM2."""

    name = "llamacpp"
    # On the CPU a prompt token costs llama.cpp a good part of a decode step: a small budget keeps
    # running streams readable while long prompts arrive, and makes those prompts wait longer
    # (small chunks cost more a token). The trade is measured by `make bench` (mixed load).
    step_tokens = 32
    # With no stream to stall, a long prompt goes in llama.cpp's own batch: larger chunks cost
    # less a token (each chunk re-reads the weights and the prompt's KV).
    idle_step_tokens = N_BATCH
    prefix_caching = True

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self._llama: LlamaModel | None = None
        self._runner: LlamaCppRunner | None = None

    def _load(self) -> LoadedModel:
        path, model_id = self._gguf()
        self._llama = LlamaModel(path)
        tokenizer = (
            AutoTokenizer.from_pretrained(self.settings.tokenizer)
            if self.settings.tokenizer
            else load_gguf_tokenizer(path, self.settings.cache_dir)
        )
        eos_ids = check_vocab(self._llama, tokenizer)
        threads = self.settings.cpu_threads or granted_cpus()
        # torch only samples here (a row of logits a stream): its own OpenMP pool would spin
        # beside llama.cpp's threads and slow them.
        torch.set_num_threads(1)
        batch = self.settings.max_batch_size
        window = self._window(batch)
        self._runner = LlamaCppRunner(
            self._llama,
            batch,
            window,
            threads,
            prefix_caching=self.settings.prefix_caching,
            host_cache_bytes=int(self.settings.prompt_cache_gib * GIB),
            step_tokens=self.settings.max_num_batched_tokens or self.step_tokens,
        )
        reserved = batch * self._runner.n_ctx_seq
        logger.info(
            "loaded %s with llama.cpp, %d threads (one fewer for a lone token); KV cache: %d "
            "sequences x %d tokens = %d tokens, %.2f GiB; prefix caching %s, host prompt cache "
            "up to %.2f GiB",
            path.name,
            self._runner.n_threads,
            batch,
            self._runner.n_ctx_seq,
            reserved,
            kv_cache_bytes(self._llama, reserved) / GIB,
            "on" if self.settings.prefix_caching else "off",
            self.settings.prompt_cache_gib,
        )
        return LoadedModel(
            model_id=model_id,
            tokenizer=tokenizer,
            runner=self._runner,
            context_window=min(window, self._runner.n_ctx_seq),
            eos_ids=eos_ids,
        )

    def shutdown(self) -> None:
        """Stop the batching loop, then free llama.cpp's context and model."""
        super().shutdown()
        if self._batcher is not None and self._batcher.is_alive():
            return  # still inside llama.cpp: freeing its memory now would crash the process
        if self._runner is not None:
            self._runner.close()
        if self._llama is not None:
            self._llama.close()

    def _window(self, sequences: int) -> int:
        """Tokens per sequence: the context length, capped by an equal share of the KV budget
        (whole 256-token blocks, as llama.cpp allocates them)."""
        assert self._llama is not None
        memory = machine_memory_bytes()
        budget = kv_budget_bytes(self.settings.kv_cache_gib, memory)
        per_token = kv_cache_bytes(self._llama, 1)
        share = budget // per_token // sequences // _KV_BLOCK * _KV_BLOCK
        if share < _KV_BLOCK:
            raise EngineError(
                f"A KV cache of {budget / GIB:.2f} GiB holds {budget // per_token} tokens "
                f"({per_token / 1024:.0f} KiB each): fewer than {_KV_BLOCK} for each of "
                f"{sequences} sequences. Raise LLM_KV_CACHE_GIB or lower LLM_MAX_BATCH_SIZE."
            )
        window = min(context_window(self._llama.n_ctx_train, self.settings.max_context_len), share)
        check_fits(
            sequences * window * per_token, int(self.settings.prompt_cache_gib * GIB), memory
        )
        return window

    def _gguf(self) -> tuple[Path, str]:
        if not self.settings.model:
            return embedded_gguf_path(), EMBEDDED_MODEL_ID
        path = Path(self.settings.model).expanduser()
        if not path.is_file() or path.suffix.lower() != ".gguf":
            raise EngineError(
                f"LLM_MODEL={self.settings.model!r} is not a local .gguf file: the llamacpp "
                "engine serves GGUF models (e.g. mistral-7b-instruct-v0.2.Q4_K_M.gguf from "
                "TheBloke/Mistral-7B-Instruct-v0.2-GGUF); leave it empty for the embedded model."
            )
        return path, path.stem


def kv_cache_bytes(model: LlamaModel, cells: int) -> int:
    """Memory of a KV cache of `cells` token cells (keys and values of every layer, f16)."""
    handle = model.handle
    layers = llama.llama_model_n_layer(handle)
    kv_heads = llama.llama_model_n_head_kv(handle)
    head_dim = llama.llama_model_n_embd(handle) // max(1, llama.llama_model_n_head(handle))
    return 2 * layers * kv_heads * head_dim * _KV_BYTES * cells


def check_vocab(model: LlamaModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Fail unless llama.cpp and the tokenizer share the vocabulary; the ids that end a reply.

    The end-of-generation set is llama.cpp's (EOS, EOT and the model's other end tokens) plus the
    tokenizer's EOS; each of them, and BOS, must be the same token on both sides, and both sides
    must have the same number of tokens. Other differences in token spelling are only logged.
    """
    if len(tokenizer) != model.n_vocab:
        raise EngineError(
            f"The tokenizer has {len(tokenizer)} tokens, {model.path.name} has {model.n_vocab}: "
            "they belong to different models (check LLM_TOKENIZER)."
        )
    eos_ids = model.eos_ids() | ({tokenizer.eos_token_id} - {None})
    special = sorted(eos_ids | ({tokenizer.bos_token_id} - {None}))
    ours = tokenizer.convert_ids_to_tokens(special)
    for token, text in zip(special, ours, strict=True):
        if model.token_text(token) != text:
            raise EngineError(
                f"Token {token} is {text!r} for the tokenizer and {model.token_text(token)!r} for "
                f"llama.cpp in {model.path.name}: the tokenizer does not match the model."
            )
    spelled = tokenizer.convert_ids_to_tokens(list(range(model.n_vocab)))
    differ = sum(model.token_text(t) != text for t, text in enumerate(spelled))
    if differ:
        logger.warning("%d of %d tokens are spelled differently by llama.cpp", differ, len(spelled))
    return frozenset(eos_ids)
