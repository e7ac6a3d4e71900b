"""A llama-architecture GGUF of two tiny layers with random weights and the embedded model's
vocabulary: for tests of bookkeeping against llama.cpp's real memory, where what the model says
does not matter and a pass over the real weights would only cost time."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from backend.engines.gguf_file import GGUFFile

EMBEDDING = 64
HEADS, KV_HEADS = 4, 2
FEED_FORWARD = 128
LAYERS = 2


def write_tiny_llama(source: Path, dest: Path) -> Path:
    """A GGUF at `dest` with `source`'s tokenizer fields (the same token ids) and tiny layers."""
    reader = GGUFFile(source)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(dest, "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(EMBEDDING)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(EMBEDDING // HEADS)
    writer.add_vocab_size(vocab)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    for name, shape in _tensors(vocab):
        writer.add_tensor(name, _weights(shape, seed=len(name) * 7919 + sum(shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _tensors(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes (rows, columns: numpy's order) of a llama model without a separate
    output matrix (llama.cpp ties it to the embeddings)."""
    kv = EMBEDDING // HEADS * KV_HEADS
    tensors = [("token_embd.weight", (vocab, EMBEDDING)), ("output_norm.weight", (EMBEDDING,))]
    for i in range(LAYERS):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (EMBEDDING,)),
            (f"blk.{i}.attn_q.weight", (EMBEDDING, EMBEDDING)),
            (f"blk.{i}.attn_k.weight", (kv, EMBEDDING)),
            (f"blk.{i}.attn_v.weight", (kv, EMBEDDING)),
            (f"blk.{i}.attn_output.weight", (EMBEDDING, EMBEDDING)),
            (f"blk.{i}.ffn_norm.weight", (EMBEDDING,)),
            (f"blk.{i}.ffn_gate.weight", (FEED_FORWARD, EMBEDDING)),
            (f"blk.{i}.ffn_up.weight", (FEED_FORWARD, EMBEDDING)),
            (f"blk.{i}.ffn_down.weight", (EMBEDDING, FEED_FORWARD)),
        ]
    return tensors


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    if len(shape) == 1:  # a norm's scale
        return np.ones(shape, dtype=np.float32)
    return np.random.default_rng(seed).normal(0, 0.05, shape).astype(np.float32)
