"""The engines' own speed in this process, with no server and none of our loop: the ceilings."""

from __future__ import annotations

import os
import time

import torch

from backend.engines.embedded import embedded_gguf_path, load_embedded_model
from backend.engines.hf import pick_dtype
from backend.settings import BackendSettings
from bench.load import PROMPT, Run


def prompt_ids() -> list[int]:
    """The benchmark prompt through the embedded model's chat template (as every engine sends)."""
    settings = BackendSettings()
    _, tokenizer = load_embedded_model(settings.cache_dir, torch.float32)
    return list(
        tokenizer.apply_chat_template(
            PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def llamacpp_batch(batch: int, max_tokens: int) -> Run:
    """llama.cpp's low-level batch API on the embedded GGUF, driven directly (after a warm-up)."""
    from bench.llamacpp import raw_llamacpp_run

    threads = len(os.sched_getaffinity(0))
    raw_llamacpp_run(embedded_gguf_path(), prompt_ids(), batch, 8, threads)
    return Run(*raw_llamacpp_run(embedded_gguf_path(), prompt_ids(), batch, max_tokens, threads))


def transformers_generate(batch: int, max_tokens: int) -> Run:
    """transformers' `generate` on the embedded model: `batch` copies of the prompt, greedy,
    exactly `max_tokens` new tokens each, prefill included (after one warm-up)."""
    settings = BackendSettings()
    model, tokenizer = load_embedded_model(settings.cache_dir, pick_dtype(settings.dtype))
    model.eval()
    prompt = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = torch.tensor([list(prompt)] * batch)
    options = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **{**options, "max_new_tokens": 8, "min_new_tokens": 8},
        )
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        seconds = time.perf_counter() - start
    return Run((out.shape[1] - ids.shape[1]) * batch, seconds)
