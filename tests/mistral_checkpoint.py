"""A tiny local checkpoint in Mistral-7B-Instruct-v0.2's formats, built in a second.

The tokenizer is SentencePiece BPE with byte fallback and a `▁` word prefix (Metaspace), ids
0/1/2 for `<unk>`/`<s>`/`</s>`, like Mistral's; its chat template is v0.2's, which has no system
role and raises on roles that do not alternate. The model is a two-layer `MistralForCausalLM`
with random weights: enough to exercise every code path, never to say anything sensible.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, PreTrainedTokenizerBase

# The chat template shipped with Mistral-7B-Instruct-v0.2 (its tokenizer_config.json).
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

_CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Write a long story about a dragon who learns to bake bread in the mountains.",
    "What is my name? My name is Ada. Remember it, please.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "안녕하세요! 반갑습니다. 오늘 날씨가 좋네요.",
    "Party time 🎉 with friends, coffee ☕ and cake.",
    "  Leading spaces, tabs\tand new\nlines matter to a tokenizer.",
]


def build_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """Train the SentencePiece model and wrap it as Mistral's tokenizer class does."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(_CORPUS * 20) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    corpus.unlink()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    tokenizer = AutoTokenizer.from_pretrained(directory)  # converts tokenizer.model
    tokenizer.chat_template = MISTRAL_V02_TEMPLATE
    return tokenizer


def build_checkpoint(directory: Path) -> Path:
    """Tokenizer plus a two-layer Mistral with random (seeded) weights, saved as safetensors."""
    tokenizer = build_tokenizer(directory)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
