"""The `hf` engine: a transformers causal LM on the CPU, continuously batched.

`PaddedBatchRunner` keeps one key/value cache for the whole batch (`BatchKVCache`), left-padded so
that sequences of different lengths decode in one forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicLayer

from backend.engines.base import register_engine
from backend.engines.batch_cache import BatchKVCache
from backend.engines.cpus import granted_cpus
from backend.engines.embedded import EMBEDDED_MODEL_ID, load_embedded_model
from backend.engines.kv_budget import GIB, kv_budget_bytes, machine_memory_bytes
from backend.engines.prefix_store import PrefixStore
from backend.engines.runner_engine import LoadedModel, RunnerEngine, context_window
from backend.errors import EngineError

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# CPU flags of native bf16 matmuls; without them bf16 is emulated and slower than fp32.
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}


def pick_dtype(requested: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> torch.dtype:
    """The dtype to load weights in: the requested one, or bf16 where the CPU runs it natively."""
    if requested != "auto":
        return _DTYPES[requested]
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        flags = set()
    return torch.bfloat16 if flags & _BF16_CPU_FLAGS else torch.float32


_Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, n, dim]


class PaddedBatchRunner:
    """`BatchRunner` over one left-padded `BatchKVCache` shared by every sequence in the batch.

    A prompt is prefilled alone into its own cache, in as many chunks as the loop sends; it joins
    the shared cache at its first decode step. With prefix caching, a finished sequence's KV
    (its row, trimmed of padding) is parked in host memory under a byte budget, and a prompt that
    begins with the same tokens resumes from a copy of it instead of from position 0.
    """

    chunked_prefill: ClassVar[bool] = True
    mixed_batch: ClassVar[bool] = False  # prompts go in alone, then join the padded batch

    def __init__(
        self,
        model: PreTrainedModel,
        capacity: int = 8,
        prefix_caching: bool = True,
        host_cache_bytes: int = 0,
        kv_budget_bytes: int = 0,
    ) -> None:
        self._model = model
        self.capacity = capacity
        self.prefix_caching = prefix_caching
        self._cache = BatchKVCache(model.config.num_hidden_layers, expected_rows=capacity)
        self.parked: PrefixStore[_Layers] = PrefixStore(host_cache_bytes)
        self._kv_budget = kv_budget_bytes  # live and parked KV together; 0 = no bound
        self._token_bytes = _config_token_bytes(model)  # one token's keys and values, all layers
        # The budget in tokens, which the loop's scheduler admits and preempts by.
        self.kv_tokens = kv_budget_bytes // self._token_bytes if kv_budget_bytes else None
        self.reset()

    @torch.inference_mode()  # the buffers are inference tensors: only changed in this mode
    def reset(self) -> None:
        """Forget every sequence (parked prefixes are copies and stay valid)."""
        self._order: list[int] = []  # seq id of each row of the shared cache
        self._prefilling: dict[int, DynamicCache] = {}  # prompts not yet decoding
        self._tokens: dict[int, list[int]] = {}  # what each sequence's KV holds
        self._cache.reset()

    def lookup(self, prompt_ids: list[int]) -> int:
        """The prompt tokens `resume` would start from: the longest parked prefix."""
        shared, entry = self.parked.best(prompt_ids)
        return 0 if entry is None else max(0, min(shared, len(prompt_ids) - 1))

    @torch.inference_mode()
    def resume(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Start from a copy of the parked prefix sharing the most tokens with the prompt."""
        shared, entry = self.parked.best(prompt_ids)
        keep = min(shared, len(prompt_ids) - 1)
        if entry is None or keep == 0:
            return 0
        self._prefilling[seq_id] = _cache_of(entry.payload, keep)
        self._tokens[seq_id] = prompt_ids[:keep]
        return keep

    @torch.inference_mode()
    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Extend a sequence's own cache by a chunk of its prompt; logits after the chunk."""
        cache = self._prefilling.setdefault(seq_id, DynamicCache())
        out = self._model(
            input_ids=torch.tensor([prompt_ids]), cache=cache, use_cache=True, logits_to_keep=1
        )
        self._tokens.setdefault(seq_id, []).extend(prompt_ids)
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """One forward pass for the whole batch; returns logits in the order of `seq_ids`.
        Parked prefixes give way to the step's tokens (least recently used first); the loop's
        scheduler keeps live sequences within the budget (`kv_tokens`), preempting if need be."""
        self._make_room(seq_ids)
        for seq_id in seq_ids:
            if seq_id in self._prefilling:
                prompt = self._prefilling.pop(seq_id)
                self._cache.append_row(_layers(prompt))
                self._order.append(seq_id)
        rows = [self._order.index(seq_id) for seq_id in seq_ids]
        if len(rows) != len(self._order):  # the other rows would decode garbage tokens
            raise EngineError(f"decode got {len(rows)} of the {len(self._order)} live sequences")
        tokens = torch.empty(len(self._order), 1, dtype=torch.long)
        tokens[rows, 0] = torch.tensor(token_ids)
        positions = self._cache.positions().unsqueeze(1)
        out = self._model(
            input_ids=tokens,
            attention_mask=self._cache.attention_mask(1),
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
        )
        self._cache.advance(1)
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            self._tokens[seq_id].append(token)
        return out.logits[rows, -1]

    @torch.inference_mode()
    def fork(self, parent_id: int, child_id: int) -> bool:
        """The child's own prefill cache gets a copy of the parent's, which joins the shared
        cache at its first decode step as any prompt."""
        prompt = _layers(self._prefilling[parent_id])
        self._prefilling[child_id] = _cache_of(prompt, prompt[0][0].shape[2])
        self._tokens[child_id] = list(self._tokens[parent_id])
        return True

    @torch.inference_mode()
    def release(self, seq_id: int) -> None:
        """Drop a sequence (parking its KV first); the last row takes its place."""
        tokens = self._tokens.pop(seq_id, [])
        prompt = self._prefilling.pop(seq_id, None)
        if prompt is not None:
            self._park(tokens, _layers(prompt))
        if seq_id not in self._order:
            return
        row = self._order.index(seq_id)
        self._park(tokens, self._cache.row_layers(row))
        self._cache.remove_row(row)
        self._order[row] = self._order[-1]
        self._order.pop()

    def kv_usage(self) -> float:
        """Tokens of running sequences over the cells the shared cache has allocated (it grows
        with the batch; a prompt being prefilled joins it at its first decode step)."""
        return self._cache.filled()

    def _make_room(self, seq_ids: list[int]) -> None:
        if not self._kv_budget:
            return
        needed = self._live_bytes() + len(seq_ids) * self._token_bytes  # this step's tokens
        self.parked.shrink_to(max(0, self._kv_budget - needed))

    def _live_bytes(self) -> int:
        return sum(len(tokens) for tokens in self._tokens.values()) * self._token_bytes

    def _park(self, tokens: list[int], layers: _Layers) -> None:
        if not self.prefix_caching or not tokens or layers[0][0].shape[2] != len(tokens):
            return  # a sequence whose cache does not hold exactly its tokens is not reused
        nbytes = _bytes_per_token(layers) * len(tokens)
        if self._kv_budget:
            room = self._kv_budget - self._live_bytes() - nbytes
            if room < 0:
                return
            self.parked.shrink_to(room)
        self.parked.put(tokens, layers, nbytes)


def _cache_of(layers: _Layers, length: int) -> DynamicCache:
    """A new cache of the first `length` positions of `layers` (copied: `update` concatenates)."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys[:, :, :length], values[:, :, :length], index)
    return cache


def _bytes_per_token(layers: _Layers) -> int:
    """Keys and values of one token over all layers."""
    return sum(k[0, :, 0].nbytes + v[0, :, 0].nbytes for k, v in layers)


def _config_token_bytes(model: PreTrainedModel) -> int:
    """Keys and values of one token over all layers, from the model's configuration (as
    `_bytes_per_token` measures them on a cache): layers x 2 x KV heads x head size x dtype."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_dim * model.dtype.itemsize


def _layers(cache: DynamicCache) -> _Layers:
    layers: _Layers = []
    for layer in cache.layers:  # a decoder's dynamic cache: every layer has keys and values
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.values is not None
        layers.append((layer.keys, layer.values))
    return layers


@register_engine
class HFEngine(RunnerEngine):
    """transformers on the CPU; `LLM_MODEL` empty serves the embedded SmolLM2-135M-Instruct."""

    name = "hf"
    prefix_caching = True

    def _load(self) -> LoadedModel:
        torch.set_num_threads(self.settings.cpu_threads or granted_cpus())
        dtype = pick_dtype(self.settings.dtype)
        model: PreTrainedModel
        tokenizer: PreTrainedTokenizerBase
        if self.settings.model:
            model_id = self.settings.model
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        else:
            model_id = EMBEDDED_MODEL_ID
            model, tokenizer = load_embedded_model(self.settings.cache_dir, dtype)
        model.eval()
        logger.info("loaded %s as %s on %d threads", model_id, dtype, torch.get_num_threads())
        return LoadedModel(
            model_id=model_id,
            tokenizer=tokenizer,
            runner=PaddedBatchRunner(
                model,
                self.settings.max_batch_size,
                prefix_caching=self.settings.prefix_caching,
                host_cache_bytes=int(self.settings.prompt_cache_gib * GIB),
                kv_budget_bytes=kv_budget_bytes(self.settings.kv_cache_gib, machine_memory_bytes()),
            ),
            context_window=context_window(
                int(getattr(model.config, "max_position_embeddings", 0) or 0),
                self.settings.max_context_len,
            ),
            eos_ids=_eos_ids(model, tokenizer),
        )


def _eos_ids(model: PreTrainedModel, tokenizer: object) -> frozenset[int]:
    """The generation config's end-of-sequence ids and the tokenizer's (the config is shared with
    the model: read, never changed)."""
    configured = model.generation_config.eos_token_id
    ids = [*configured] if isinstance(configured, list) else [configured]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return frozenset(i for i in ids if i is not None)
