"""The embedded model converted from its GGUF into a transformers checkpoint: the rows' order,
and the same predictions as llama.cpp reading the GGUF itself."""

from __future__ import annotations

from collections.abc import Callable

import torch

from backend.engines.embedded import _unpermuted, load_embedded_model
from backend.engines.hf import HFEngine
from backend.engines.llamacpp_runner import LlamaCppRunner
from tests.backend.engines.test_llamacpp import teacher_forced_alone


def test_unpermuting_undoes_llama_cpps_permute() -> None:
    heads, rows, columns = 3, 24, 5
    hf = torch.arange(rows * columns, dtype=torch.float32).reshape(rows, columns)
    # `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py, applied to q_proj and k_proj.
    gguf = hf.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)
    assert not torch.equal(gguf, hf)
    assert torch.equal(_unpermuted(gguf, heads), hf)


def test_the_converted_model_predicts_as_llama_cpp_reading_the_gguf(
    hf_engine: HFEngine, make_runner: Callable[..., LlamaCppRunner]
) -> None:
    """The checkpoint `hf` serves (converted by `_convert` into the suite's cache on a fresh
    clone), teacher-forced on llama.cpp's greedy reply: the two agree within what quantization
    explains (llama.cpp computes with the 4-bit blocks, transformers with their values)."""
    model = load_embedded_model(hf_engine.settings.cache_dir, torch.float32)[0].eval()
    prompt = hf_engine.encode_chat([{"role": "user", "content": "Name three colors and a fruit."}])
    reply, llama_logits = teacher_forced_alone(make_runner(n_seq_max=1), prompt, 12)
    with torch.inference_mode():
        hf_logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 :]
    llama_scores = torch.log_softmax(llama_logits.float(), dim=-1)
    hf_scores = torch.log_softmax(hf_logits.float(), dim=-1)
    divergence = (llama_scores.exp() * (llama_scores - hf_scores)).sum(dim=-1)
    agreement = (llama_logits.argmax(dim=-1) == hf_logits.argmax(dim=-1)).float().mean()
    assert float(divergence.mean()) < 0.1 and float(agreement) >= 0.75, (divergence, agreement)
