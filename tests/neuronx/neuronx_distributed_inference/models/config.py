"""models/config.py: `NeuronConfig` (the keywords the `nxdi` engine and its tests use, with
their defaults and checks) and `InferenceConfig` (load, validate, save as JSON)."""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

CONFIG_FILE = "neuron_config.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_torch_dtype(dtype_str: str) -> torch.dtype:
    """`to_torch_dtype`."""
    assert dtype_str in _DTYPES, f"Unsupported dtype: {dtype_str}"
    return _DTYPES[dtype_str]


def to_dict(obj: Any) -> Any:
    """`to_dict`: what `InferenceConfig.save` writes (objects as their `__dict__`)."""
    if type(obj) is dict:
        return {k: to_dict(v) for k, v in obj.items()}
    if type(obj) is list:
        return [to_dict(v) for v in obj]
    if inspect.isclass(obj):
        return {"__module__": obj.__module__, "__name__": obj.__name__}
    if hasattr(obj, "__dict__"):
        return {k: to_dict(v) for k, v in obj.__dict__.items()}
    if type(obj) is torch.dtype:
        return str(obj).split(".")[1]
    return obj


class OnDeviceSamplingConfig:
    """`OnDeviceSamplingConfig`: with one, the graphs return sampled tokens, not logits."""

    def __init__(self, **kwargs: Any) -> None:
        self.do_sample = kwargs.pop("do_sample", False)
        self.top_k = kwargs.pop("top_k", 1)
        self.top_p = kwargs.pop("top_p", 1.0)
        self.temperature = kwargs.pop("temperature", 1.0)
        self.dynamic = kwargs.pop("dynamic", False)
        self.deterministic = kwargs.pop("deterministic", False)
        self.global_topk = kwargs.pop("global_topk", 256)


class NeuronConfig:
    """`NeuronConfig.__init__`, for the keywords below. An unknown keyword is not an error there:
    it is logged and ignored (the last lines of `__init__`)."""

    def __init__(self, **kwargs: Any) -> None:
        self.batch_size = kwargs.pop("batch_size", 1)
        self.padding_side = kwargs.pop("padding_side", "right")
        self.allow_input_truncation = kwargs.pop("allow_input_truncation", False)
        self.seq_len = kwargs.pop("seq_len", 128)
        if "torch_dtype" in kwargs:
            self.torch_dtype = kwargs.pop("torch_dtype")
            if isinstance(self.torch_dtype, str):
                self.torch_dtype = to_torch_dtype(self.torch_dtype)
            # Keeps `load_pretrained_config` from replacing it with the checkpoint's dtype.
            self.overrides_torch_dtype = kwargs.pop("overrides_torch_dtype", True)
        else:
            self.torch_dtype = torch.bfloat16
            self.overrides_torch_dtype = False
        self.max_context_length = kwargs.pop("max_context_length", self.seq_len)
        self.max_length = kwargs.pop("max_length", self.seq_len)
        assert self.max_context_length <= self.max_length, (
            "max_context_length cannot be more than max_length"
        )
        # Continuous batching: the context-encoding and token-generation graphs' batch sizes.
        self.ctx_batch_size = kwargs.pop("ctx_batch_size", self.batch_size)
        self.tkg_batch_size = kwargs.pop("tkg_batch_size", self.batch_size)
        self.max_batch_size = kwargs.pop("max_batch_size", self.batch_size)
        self.is_continuous_batching = kwargs.pop("is_continuous_batching", False)
        # Rows of the KV cache: `batch_size`, not `tkg_batch_size`.
        self.kv_cache_batch_size = kwargs.pop("kv_cache_batch_size", self.batch_size)
        self.on_device_sampling_config = kwargs.pop("on_device_sampling_config", None)
        if type(self.on_device_sampling_config) is dict:
            self.on_device_sampling_config = OnDeviceSamplingConfig(
                **self.on_device_sampling_config
            )
        self.enable_bucketing = kwargs.pop("enable_bucketing", False)
        self.context_encoding_buckets = kwargs.pop("context_encoding_buckets", None)
        self.token_generation_buckets = kwargs.pop("token_generation_buckets", None)
        if self.context_encoding_buckets is not None:
            self.context_encoding_buckets.sort()
            assert self.context_encoding_buckets[-1] <= self.max_context_length, (
                f"Context bucket {self.context_encoding_buckets[-1]} should be <= "
                f"{self.max_context_length}"
            )
        if self.token_generation_buckets is not None:
            self.token_generation_buckets.sort()
            assert self.token_generation_buckets[-1] <= self.max_length, (
                f"Token generation bucket {self.token_generation_buckets[-1]} should be <= "
                f"{self.max_length}"
            )
        self.tp_degree = kwargs.pop("tp_degree", 1)
        self.save_sharded_checkpoint = kwargs.pop("save_sharded_checkpoint", False)
        if kwargs:
            logging.warning(f"NeuronConfig init: Unexpected keyword arguments: {kwargs}")


class InferenceConfig:
    """`InferenceConfig`: the checkpoint's config (by `load_config`) plus keyword overrides, then
    `validate_config`; `save` and `load` go through `neuron_config.json`."""

    def __init__(
        self,
        neuron_config: NeuronConfig,
        load_config: Callable[[InferenceConfig], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.neuron_config = neuron_config
        if load_config is not None:
            load_config(self)
        for key, value in kwargs.items():  # set after the checkpoint's: they override it
            setattr(self, key, value)
        self.validate_config()

    def get_required_attributes(self) -> list[str]:
        """The list of attributes that must be present for validation to pass."""
        return []

    def validate_config(self) -> None:
        """`validate_config`: a missing required attribute fails an assert."""
        missing = [x for x in self.get_required_attributes() if not hasattr(self, x)]
        assert len(missing) == 0, f"Config must define {missing}"

    def save(self, model_path: str) -> None:
        """`save` -> `to_json_file`."""
        os.makedirs(model_path, exist_ok=True)
        with open(os.path.join(model_path, CONFIG_FILE), "w", encoding="utf-8") as writer:
            writer.write(json.dumps(to_dict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model_path: str, **kwargs: Any) -> InferenceConfig:
        """`load` -> `from_json_string`: the JSON's keys as keyword arguments (FileNotFoundError
        without the file)."""
        with open(os.path.join(model_path, CONFIG_FILE), encoding="utf-8") as reader:
            merged = {**json.loads(reader.read()), **kwargs}
        merged["neuron_config"] = cls.get_neuron_config_cls()(**merged["neuron_config"])
        return cls(**merged)

    @classmethod
    def get_neuron_config_cls(cls) -> type[NeuronConfig]:
        return NeuronConfig
