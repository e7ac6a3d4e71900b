"""models/llama/modeling_llama.py: the Llama architecture, which NxDI 0.8 runs Mistral with
(the SDK's model reference: "any model based on Llama, such as Mistral"; vLLM's Neuron loader
maps `MistralForCausalLM` to `NeuronLlamaForCausalLM`). 0.8's public source has no
`models/mistral`; it appears in 0.9, for Trn2 and newer only."""

from __future__ import annotations

from neuronx_distributed_inference.models.config import InferenceConfig
from neuronx_distributed_inference.models.model_base import NeuronBaseForCausalLM


class LlamaInferenceConfig(InferenceConfig):
    """`LlamaInferenceConfig`."""

    def get_required_attributes(self) -> list[str]:
        """`get_required_attributes`: `rope_theta` is read as an attribute (RoPE's base in
        `NeuronLlamaAttention`), which transformers 5 no longer sets."""
        return [
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "pad_token_id",
            "vocab_size",
            "max_position_embeddings",
            "rope_theta",
            "rms_norm_eps",
            "hidden_act",
        ]


class NeuronLlamaForCausalLM(NeuronBaseForCausalLM):
    """`NeuronLlamaForCausalLM`."""

    @classmethod
    def get_config_cls(cls) -> type[LlamaInferenceConfig]:
        return LlamaInferenceConfig
