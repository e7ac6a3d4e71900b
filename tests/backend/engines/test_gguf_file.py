"""gguf-py's reader over a plain array: what it reads, and transformers reading with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from backend.engines.gguf_file import GGUFFile, gguf_read_as_array


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF with every kind of metadata a model file has (scalars, strings, arrays of both)
    and tensors of two types."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(4096)
    writer.add_string("general.name", "small")
    writer.add_token_list([f"token-{i}" for i in range(300)])
    writer.add_token_merges([f"a{i} b{i}" for i in range(200)])
    writer.add_token_scores([float(i) / 7 for i in range(300)])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((300, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_what_gguf_py_reads(small_gguf: Path) -> None:
    ours, theirs = GGUFFile(small_gguf), gguf.GGUFReader(small_gguf)
    assert type(ours.data) is np.ndarray and type(theirs.data) is np.memmap
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data)
        assert mine.contents() == field.contents(), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.tensor_type, list(mine.shape)) == (tensor.tensor_type, list(tensor.shape))
        assert np.array_equal(mine.data, tensor.data)


def test_transformers_reads_the_config_with_it(
    small_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    opened: list[Path] = []
    monkeypatch.setattr(GGUFFile, "__init__", spy(GGUFFile.__init__, opened))
    with gguf_read_as_array():
        config = load_gguf_checkpoint(small_gguf, return_tensors=False)["config"]
    assert opened == [small_gguf] and config["model_type"] == "llama"


def spy(init: Any, opened: list[Path]) -> Any:
    def recorded(self: GGUFFile, path: Path, *args: Any, **kwargs: Any) -> None:
        opened.append(Path(path))
        init(self, path, *args, **kwargs)

    return recorded


def test_gguf_py_reads_as_array_inside_only(small_gguf: Path) -> None:
    original = gguf.GGUFReader
    with gguf_read_as_array():
        assert type(gguf.GGUFReader(small_gguf).data) is np.ndarray
    assert gguf.GGUFReader is original
    with pytest.raises(KeyError), gguf_read_as_array():
        raise KeyError("a failed read")
    assert gguf.GGUFReader is original
