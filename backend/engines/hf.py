"""The `hf` engine: a transformers causal LM on the CPU, continuously batched.

`PaddedBatchRunner` keeps one key/value cache for the whole batch, left-padded so that sequences
of different lengths decode in one forward pass; joining and leaving sequences re-pad it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from backend.engines.base import register_engine
from backend.engines.embedded import EMBEDDED_MODEL_ID, load_embedded_model
from backend.engines.runner_engine import LoadedModel, RunnerEngine

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


class PaddedBatchRunner:
    """`BatchRunner` over one left-padded `DynamicCache` shared by every sequence in the batch."""

    def __init__(self, model: PreTrainedModel) -> None:
        self._model = model
        self.reset()

    def reset(self) -> None:
        """Forget every sequence."""
        self._order: list[int] = []  # seq id of each batch row
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: keys, values
        # Built once per batch change: rebuilding it every step would copy the whole cache.
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # [batch, cache length], 0 = padding
        self._positions = torch.zeros(0, dtype=torch.long)  # next position id of each row

    @torch.inference_mode()
    def prefill(self, seq_id: int, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt alone, then add its cache to the batch."""
        out = self._model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._join(seq_id, layers, len(prompt_ids))
        return out.logits[0, -1]

    @torch.inference_mode()
    def decode(self, seq_ids: list[int], token_ids: list[int]) -> torch.Tensor:
        """One forward pass for the whole batch; returns logits in the order of `seq_ids`."""
        rows = [self._order.index(seq_id) for seq_id in seq_ids]
        tokens = torch.empty(len(self._order), 1, dtype=torch.long)
        tokens[rows, 0] = torch.tensor(token_ids)
        self._mask = torch.cat([self._mask, torch.ones(len(self._order), 1, dtype=torch.long)], 1)
        if self._cache is None:
            self._cache = DynamicCache(self._layers)
        out = self._model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=self._positions.unsqueeze(1),
            cache=self._cache,
            use_cache=True,
        )
        self._positions = self._positions + 1
        return out.logits[rows, -1]

    def release(self, seq_id: int) -> None:
        """Drop a sequence's row, then the padding columns no remaining row needs."""
        if seq_id not in self._order:
            return
        keep = [i for i, other in enumerate(self._order) if other != seq_id]
        if not keep:
            self.reset()
            return
        self._order = [self._order[i] for i in keep]
        mask = self._mask[keep]
        start = int(mask.any(dim=0).long().argmax())  # first column some row attends to
        self._mask = mask[:, start:]
        self._positions = self._positions[keep]
        self._layers = [(k[keep, :, start:], v[keep, :, start:]) for k, v in self._kv()]
        self._cache = None

    def _join(self, seq_id: int, layers: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
        mask = torch.ones(1, n, dtype=torch.long)
        if self._order:
            width = max(self._mask.shape[1], n)
            self._layers = [
                (_cat_left_padded(k, k_new, width), _cat_left_padded(v, v_new, width))
                for (k, v), (k_new, v_new) in zip(self._kv(), layers, strict=True)
            ]
            mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        else:
            self._layers = layers
        self._mask = mask
        self._positions = torch.cat([self._positions, torch.tensor([n])])
        self._order.append(seq_id)
        self._cache = None

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of every layer, as the last decode step left them."""
        if self._cache is None:
            return self._layers
        return [(layer.keys, layer.values) for layer in self._cache.layers]


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cat_left_padded(batch: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    """Stack two [batch, heads, length, dim] caches along the batch, left-padding the length."""
    return torch.cat([_pad_left(batch, width, dim=2), _pad_left(new, width, dim=2)])


@register_engine
class HFEngine(RunnerEngine):
    """transformers on the CPU; `LLM_MODEL` empty serves the embedded SmolLM2-135M-Instruct."""

    name = "hf"

    def _load(self) -> LoadedModel:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        dtype = pick_dtype(self.settings.dtype)
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
            runner=PaddedBatchRunner(model),
            context_window=_context_window(model, self.settings.max_context_len),
            eos_ids=_eos_ids(model, tokenizer),
        )


def _context_window(model: PreTrainedModel, configured: int) -> int:
    native = int(getattr(model.config, "max_position_embeddings", 0) or configured or 2048)
    return min(configured, native) if configured else native


def _eos_ids(model: PreTrainedModel, tokenizer: object) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = ids if isinstance(ids, list) else [ids]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return frozenset(i for i in ids if i is not None)
