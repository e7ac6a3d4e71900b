"""A GGUF's Hugging Face tokenizer and chat template, read by transformers once and cached.

Reading a tokenizer out of a GGUF takes seconds (every token and merge is parsed), so both CPU
engines keep the converted tokenizer under `LLM_CACHE_DIR` and read that afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.engines.cache_dir import write_atomically
from backend.errors import EngineError

logger = logging.getLogger(__name__)


def tokenizer_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    """Where the tokenizer converted from `gguf` is kept (a new file gets a new directory)."""
    real = gguf.resolve()  # a link to a file shares the file's tokenizer
    stat = real.stat()
    return cache_dir / "tokenizers" / f"{real.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def load_gguf_tokenizer(gguf: Path, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The GGUF's Hugging Face tokenizer and chat template, converted once into `cache_dir`."""
    target = tokenizer_cache_dir(gguf, cache_dir)
    if not (target / "tokenizer_config.json").exists():
        from backend.engines.gguf_file import gguf_read_as_array  # gguf-py: first starts only

        logger.info("reading the tokenizer of %s (first start only)", gguf.name)
        with gguf_read_as_array():  # transformers reads the GGUF's config with gguf-py
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise EngineError(
                f"{gguf.name} has no chat template: set LLM_TOKENIZER to the model's Hugging "
                "Face tokenizer (a directory or hub id)."
            )

        def save(staging: Path) -> None:
            tokenizer.save_pretrained(staging)

        write_atomically(target, save, "tokenizer_config.json")
    return AutoTokenizer.from_pretrained(target)
