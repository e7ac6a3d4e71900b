"""models/model_base.py `NeuronBaseForCausalLM`, with the parts of application_base.py (compile,
load), model_wrapper.py (`ModelWrapper`: int32, buckets, padding, `seq_ids` order) and
modules/kvcache/kv_cache_manager.py (which KV row a call writes) that the `nxdi` engine meets.

The compiled graphs are replaced by the checkpoint on the CPU in float32: `self._kv` holds, for
every KV row, the token at each position NxDI would have written there, and a row's logits are
the checkpoint's logits for those tokens.
"""

from __future__ import annotations

import json
import os
from math import log2
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from neuronx_distributed_inference.models.config import InferenceConfig

COMPILED_MODEL_FILE_NAME = "model.pt"
CONTEXT_ENCODING_MODEL_TAG = "context_encoding_model"
TOKEN_GENERATION_MODEL_TAG = "token_generation_model"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def normalize_path(path: str) -> str:
    """application_base.py `normalize_path`: a trailing slash (files are `path + name`)."""
    return os.path.join(os.path.normpath(path), "")


def generate_buckets(min_length: int, max_length: int) -> list[int]:
    """autobucketing.py `generate_buckets`."""
    if min_length == max_length:
        return [max_length]
    min_bound, max_bound = int(log2(min_length)), round(log2(max_length))
    return [2**i for i in range(min_bound, max_bound)] + [max_length]


class NeuronBaseForCausalLM:
    """`NeuronBaseForCausalLM` (an `nn.Module` there: calling it runs `forward`)."""

    def __init__(self, model_path: str, config: InferenceConfig | None = None) -> None:
        """application_base.py `NeuronApplicationBase.__init__`: without a config, the one
        saved by `compile` in `model_path`."""
        model_path = normalize_path(model_path)
        if config is None:
            config = self.get_config_cls().load(model_path)
        self.config = config
        self.neuron_config = config.neuron_config
        self.on_device_sampling = self.neuron_config.on_device_sampling_config is not None
        self.model_path = model_path
        self.is_compiled = os.path.isfile(model_path + COMPILED_MODEL_FILE_NAME)
        self._traced: dict[str, Any] | None = None
        self._reference: Any = None
        self._kv: list[list[int]] = []

    @classmethod
    def get_config_cls(cls) -> type[InferenceConfig]:
        raise NotImplementedError("get_config_cls is not implemented")

    def _graphs(self) -> dict[str, Any]:
        """`enable_context_encoding` / `enable_token_generation` with autobucketing.py
        `generate_buckets_for_cte` / `_for_tkg`: one graph per bucket, of the batch given by
        `ctx_batch_size` / `tkg_batch_size`."""
        nc = self.neuron_config
        if nc.enable_bucketing:
            cte = nc.context_encoding_buckets or generate_buckets(128, nc.max_context_length)
            tkg = nc.token_generation_buckets or generate_buckets(128, nc.max_length)
        else:
            cte, tkg = [nc.max_context_length], [nc.max_length]
        return {
            CONTEXT_ENCODING_MODEL_TAG: {"batch_size": nc.ctx_batch_size, "buckets": list(cte)},
            TOKEN_GENERATION_MODEL_TAG: {"batch_size": nc.tkg_batch_size, "buckets": list(tkg)},
            "tp_degree": nc.tp_degree,
            "torch_dtype": str(nc.torch_dtype),
        }

    def compile(self, compiled_model_path: str) -> None:
        """application_base.py `compile`: `neuron_config.json`, then the traced graphs in
        `model.pt` (the weights are not in it: `load` shards them from the checkpoint)."""
        path = normalize_path(compiled_model_path)
        self.config.save(path)
        Path(path + COMPILED_MODEL_FILE_NAME).write_text(json.dumps(self._graphs()))
        self.is_compiled = True

    def load(self, compiled_model_path: str) -> None:
        """application_base.py `load`: `torch.jit.load` of `model.pt` (a ValueError when it is
        missing), then the weights (`load_weights` -> `checkpoint_loader_fn`)."""
        path = normalize_path(compiled_model_path)
        traced_path = path + COMPILED_MODEL_FILE_NAME
        if not os.path.isfile(traced_path):
            raise ValueError(f"The provided filename {traced_path} does not exist")
        traced = json.loads(Path(traced_path).read_text())
        # On the device, graphs traced for other shapes fail at their first call; here at once.
        if traced != self._graphs():
            raise RuntimeError(f"{traced_path} holds graphs of another configuration")
        self._reference = self._load_weights()
        self._traced = traced
        rows = self.neuron_config.kv_cache_batch_size
        self._kv = [[0] * self.neuron_config.max_length for _ in range(rows)]

    def _load_weights(self) -> Any:
        """application_base.py `checkpoint_loader_fn` and modules/checkpoint.py
        `load_state_dict`: the checkpoint at the config's `_name_or_path`, else `model_path`.
        On the CPU with the RoPE base NxDI reads, `config.rope_theta`."""
        model_path = getattr(self.config, "_name_or_path", None)
        if model_path is None or not os.path.exists(model_path):
            model_path = self.model_path
        if not any(os.path.isfile(os.path.join(model_path, name)) for name in _WEIGHTS):
            raise FileNotFoundError(
                f"Can not find model.safetensors or pytorch_model.bin in {model_path}"
            )
        hf_config = AutoConfig.from_pretrained(model_path)
        hf_config.rope_parameters = {"rope_type": "default", "rope_theta": self.config.rope_theta}
        model = AutoModelForCausalLM.from_pretrained(model_path, config=hf_config, dtype="float32")
        return model.eval()

    def __call__(self, **kwargs: Any) -> CausalLMOutputWithPast:
        return self.forward(**kwargs)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sampling_params: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """`forward`: `preprocess_inputs`, then `_get_model_outputs` picks the graph: context
        encoding when the smallest position is 0 (`_is_prefill`), else token generation."""
        if self._traced is None:  # model_wrapper.py `ModelWrapper.forward`
            raise RuntimeError(
                "Forward called before load. Run load() or load_state_dict() making calling forward"
            )
        if seq_ids is None:  # `preprocess_inputs`
            seq_ids = torch.arange(input_ids.shape[0])
        input_ids, position_ids, seq_ids = _int32(input_ids, position_ids, seq_ids)
        if position_ids.min().item() == 0:
            logits = self._context_encoding(input_ids, position_ids, seq_ids)
        else:
            logits = self._token_generation(input_ids, position_ids, seq_ids)
        return self._construct_output(logits.unsqueeze(1))

    def _construct_output(self, logits: torch.Tensor) -> CausalLMOutputWithPast:
        """`_construct_output`: with on-device sampling the graphs return tokens, no logits."""
        if self.on_device_sampling:
            output = CausalLMOutputWithPast(logits=None)
            output.tokens = logits.argmax(dim=-1)
            return output
        return CausalLMOutputWithPast(logits=logits)

    def _context_encoding(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """`ModelWrapper.forward` runs a row a call, padded to the graph's batch
        (`_forward_with_pad`) and to its bucket by `pad_inputs` (tokens with `pad_token_id`,
        positions with 1). The logits are
        the hidden state at the first largest position (`NeuronBaseModel.forward`): with one
        token, the pad's."""
        rows = []
        bucket = self._bucket(CONTEXT_ENCODING_MODEL_TAG, input_ids.shape[1])
        pad = self.config.pad_token_id or 0
        ctx_batch = self.neuron_config.ctx_batch_size
        for row in range(input_ids.shape[0]):
            row_seq_ids, _ = _padded_seq_ids(seq_ids[row : row + 1], ctx_batch)
            ids = torch.nn.functional.pad(
                input_ids[row], (0, bucket - input_ids.shape[1]), value=pad
            )
            positions = torch.nn.functional.pad(
                position_ids[row], (0, bucket - position_ids.shape[1]), value=1
            )
            kv_row = self._kv[self._context_kv_row(row_seq_ids, row)]
            kv_row[:bucket] = ids.tolist()
            last = int(positions.max(dim=0).indices)
            rows.append(self._logits(kv_row[: last + 1]))
        return torch.stack(rows)

    def _context_kv_row(self, seq_ids: torch.Tensor, row: int) -> int:
        """kv_cache_manager.py `update_kv_by_layer_id`, context encoding: with continuous
        batching the row named by the single `seq_id`; without it, `fill_prefix` writes the
        call's own rows from the first."""
        if not self.neuron_config.is_continuous_batching:
            return row
        assert seq_ids.dim() == 1 and seq_ids.shape[0] == 1, "only supports single seq_id"
        return int(seq_ids[0])

    def _token_generation(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """`ModelWrapper.forward`: a batch of `tkg_batch_size` rows runs as given, row i
        reading and writing KV row i whatever its `seq_id` (kv_cache_manager.py writes at
        `position_ids` per row); a smaller batch goes through `_forward_with_pad`."""
        if input_ids.shape[1] != 1:  # the traced graph's input shape
            raise RuntimeError(f"{TOKEN_GENERATION_MODEL_TAG} takes [batch, 1] inputs")
        # `_infer_attention_mask`: the mask is as wide as the largest position; its bucket.
        self._bucket(TOKEN_GENERATION_MODEL_TAG, int(position_ids.max()))
        batch = self.neuron_config.tkg_batch_size
        if input_ids.shape[0] == batch:
            return self._generate(input_ids, position_ids)
        assert input_ids.shape[0] < batch, "the stand-in runs at most tkg_batch_size rows"
        return self._forward_with_pad(input_ids, position_ids, seq_ids)

    def _forward_with_pad(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """model_wrapper.py `_forward_with_pad` and `_pad_helper`: the missing slots are added
        to `seq_ids`, which are sorted; every input is padded with its first row
        (`repeat_first_batchline`) and reordered alike, so a slot left out gets the first row's
        token written at the first row's position. Logits come back in `seq_ids` order
        (`index_select`)."""
        batch = self.neuron_config.tkg_batch_size
        _, indices = _padded_seq_ids(seq_ids, batch)
        logits = self._generate(
            _repeat_first(input_ids, batch)[indices], _repeat_first(position_ids, batch)[indices]
        )
        return torch.index_select(logits, 0, seq_ids.to(torch.int64))

    def _generate(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The token-generation graph: row i writes its token at its position of KV row i,
        then attends to that row's positions up to it. A position past the cache is not checked
        on the device (the write lands out of bounds); here it raises."""
        rows = []
        for row in range(input_ids.shape[0]):
            position = int(position_ids[row, 0])
            if position >= self.neuron_config.max_length:
                raise IndexError(f"position {position} is past the KV cache (seq_len)")
            self._kv[row][position] = int(input_ids[row, 0])
            rows.append(self._logits(self._kv[row][: position + 1]))
        return torch.stack(rows)

    def _bucket(self, tag: str, input_len: int) -> int:
        """model_wrapper.py `_get_seq_bucket` (first_fit): the first bucket above `input_len`,
        or the largest if it equals it; beyond, a ValueError (`allow_input_truncation` off)."""
        buckets = self._traced[tag]["buckets"]
        for bucket in buckets:
            if input_len < bucket:
                return int(bucket)
        if input_len == buckets[-1] or self.neuron_config.allow_input_truncation:
            return int(buckets[-1])
        raise ValueError(f"Input len {input_len} exceeds largest bucket ({buckets[-1]}) for {tag}")

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        return self._reference(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def _int32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """model_wrapper.py `convert_int64_to_int32`; the compiled graphs take int32, and the
    runtime refuses another dtype."""
    converted = [t.to(torch.int32) if t.dtype == torch.int64 else t for t in tensors]
    for tensor in converted:
        if tensor.dtype != torch.int32:
            raise RuntimeError(f"the compiled graph takes int32 inputs, not {tensor.dtype}")
    return converted


def _padded_seq_ids(seq_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model_wrapper.py `ModelWrapper.forward`: a full batch runs as given; a smaller one goes
    through `_forward_with_pad`, whose `seq_ids` are completed with the missing slots and
    sorted. Returns the `seq_ids` the graph gets and the order of the rows."""
    if seq_ids.shape[0] == batch:
        return seq_ids, torch.arange(batch)
    seq_list = seq_ids.tolist()
    padded = torch.tensor(seq_list + [x for x in range(batch) if x not in seq_list])
    return torch.sort(padded)


def _repeat_first(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """model_wrapper.py `pad_with_first_batchline`."""
    padded = tensor[:1].repeat(batch, *([1] * (tensor.dim() - 1)))
    padded[: tensor.shape[0]] = tensor
    return padded
