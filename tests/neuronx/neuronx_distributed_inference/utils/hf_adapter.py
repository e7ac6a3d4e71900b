"""utils/hf_adapter.py: the config hook that reads a Hugging Face checkpoint's config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AutoConfig

from neuronx_distributed_inference.models.config import to_torch_dtype


def load_pretrained_config(model_path_or_name: str) -> Callable[[Any], None]:
    """`load_pretrained_config`: the HF config's `to_dict()` becomes the InferenceConfig's
    attributes; its dtype sets `neuron_config.torch_dtype` unless the NeuronConfig was given one
    (`overrides_torch_dtype`). Attributes transformers keeps elsewhere (transformers 5's
    `rope_parameters`) are simply absent."""

    def load_config(self: Any) -> None:
        config = AutoConfig.from_pretrained(model_path_or_name)
        config_dict = config.to_dict()
        hf_dtype = config_dict.get("dtype", config_dict.get("torch_dtype", None))
        if hf_dtype is not None:
            if self.neuron_config is not None and not self.neuron_config.overrides_torch_dtype:
                self.neuron_config.torch_dtype = hf_dtype
                if isinstance(hf_dtype, str):
                    self.neuron_config.torch_dtype = to_torch_dtype(hf_dtype)
            config_dict.pop("dtype", None)
            config_dict.pop("torch_dtype", None)
        self.__dict__.update(config_dict)

    return load_config
