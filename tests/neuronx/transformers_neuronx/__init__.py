"""Stand-in for the host side of transformers-neuronx 0.13 in continuous-batching mode.

Written from the library's source, aws-neuron/transformers-neuronx @ 1ade6d7 (Dec 2024), paths
under `src/transformers_neuronx/`. Each rule below names the function it mirrors. The compiled
graphs that run on NeuronCores are replaced by the same checkpoint run with transformers on the
CPU: every cache slot is recomputed from the tokens the library would have written into it, so
a call that would corrupt a slot (e.g. a live slot left out of a decode call) gives wrong
logits here as it would on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# The transformers-neuronx release of Neuron SDK 2.25.
__version__ = "0.13.1216"

__all__ = ["ContinuousBatchingConfig", "MistralForSampling", "NeuronConfig"]


class ContinuousBatchingConfig:
    """config.py `ContinuousBatchingConfig.__init__`: `batch_size_for_shared_caches` is an alias
    of `max_num_seqs`; unknown keywords fail its final assert."""

    def __init__(self, **kwargs: Any) -> None:
        if "max_num_seqs" in kwargs:
            self.max_num_seqs = kwargs.pop("max_num_seqs")
        else:
            self.max_num_seqs = kwargs.pop("batch_size_for_shared_caches")
        self.max_model_len = kwargs.pop("max_model_len", None)
        self.optimized_paged_attention = kwargs.pop("optimized_paged_attention", False)
        self.enable_chunked_prefill = kwargs.pop("enable_chunked_prefill", False)
        self.block_size = kwargs.pop("block_size", None)
        self.num_blocks = kwargs.pop("num_blocks", None)
        assert len(kwargs) == 0, f"unexpected key word arguments: {kwargs.keys()}"

    @property
    def batch_size_for_shared_caches(self) -> int:
        """config.py: the property returns `max_num_seqs`."""
        return int(self.max_num_seqs)


# config.py `NeuronConfig.__init__` keyword arguments (and their defaults) the stand-in knows.
_NEURON_CONFIG_DEFAULTS: dict[str, Any] = {
    "continuous_batching": None,
    "attention_layout": "HSB",
    "collectives_layout": "HSB",
    "cache_layout": "SBH",
    "padding_side": "left",
    "on_device_embedding": False,
    "on_device_generation": None,
    "cast_logits_dtype": "float32",
    "fuse_qkv": False,
    "output_all_logits": False,
    "compilation_worker_count": None,
}


class NeuronConfig:
    """config.py `NeuronConfig.__init__`: unknown keywords fail its `**kwargs` assert; continuous
    batching forces `lhs_aligned` and right padding (config.py:272-275)."""

    def __init__(self, **kwargs: Any) -> None:
        for name, default in _NEURON_CONFIG_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        assert len(kwargs) == 0, f"Unexpected NeuronConfig keyword arguments: {kwargs}"
        assert self.padding_side in ["left", "right"]
        assert self.cast_logits_dtype in ["float32", "float16", "bfloat16"]
        self.lhs_aligned = False
        if self.continuous_batching:
            self.lhs_aligned = True
            self.padding_side = "right"


def _token_sizes(n_positions: int | list[int]) -> list[int]:
    """bucket.py `token_sizes`: a list is used as given; an int gives powers of two from 128."""
    if isinstance(n_positions, list):
        return sorted(n_positions)
    sizes, size = [], 128
    while size < n_positions:
        sizes.append(size)
        size *= 2
    return [*sizes, n_positions]


def _context_sizes(estimate: int | list[int] | None, token_buckets: list[int]) -> list[int]:
    """bucket.py `context_sizes`: a list sorted, an int alone, None half of each token bucket."""
    if estimate is None:
        return [size // 2 for size in token_buckets]
    return sorted(estimate) if isinstance(estimate, list) else [estimate]


def _find(buckets: list[int], size: int) -> int:
    """bucket.py `find`: the smallest bucket holding `size`, else the largest."""
    return next((bucket for bucket in buckets if bucket >= size), buckets[-1])


class _Program:
    """The compiled graphs (decoder.py `program`), one NEFF per distinct graph."""

    def __init__(self, graphs: dict[str, bytes]) -> None:
        self.graphs = graphs

    def get_kernels(self) -> dict[str, bytes]:
        """decoder.py `get_all_kernels` -> `program.get_kernels()`."""
        return self.graphs


class MistralForSampling:
    """mistral/model.py `MistralForSampling` (continuous batching, CPU embedding, host logits)."""

    def __init__(
        self,
        config: Any,
        *,
        n_positions: int | list[int] = 2048,
        batch_size: int = 1,
        amp: str = "f32",
        tp_degree: int = 2,
        context_length_estimate: int | list[int] | None = None,
        context_unroll: int | None = None,
        unroll: int | None = None,
        neuron_config: NeuronConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = config
        # mistral/config.py:43 `MistralConfig`: read as a plain attribute, 10000 when absent
        # (transformers 5 keeps it in `rope_parameters`, so there it silently becomes 10000).
        self.rope_theta = getattr(config, "rope_theta", 10000)
        self.token_buckets = _token_sizes(n_positions)  # mistral/model.py:47-48
        self.context_buckets = _context_sizes(context_length_estimate, self.token_buckets)
        self.batch_size = batch_size
        self.amp = amp
        self.tp_degree = tp_degree
        self.neuron_config = neuron_config or NeuronConfig()
        self.program: _Program | None = None  # decoder.py:83, built by `to_neuron`
        self.compile_workers: int | None = None
        self._checkpoint: Path | None = None
        self._reference: Any = None
        self._slots: list[list[int]] = []

    @classmethod
    def from_pretrained(
        cls, pretrained_model_path: str, *model_args: Any, **kwargs: Any
    ) -> MistralForSampling:
        """module.py `PretrainedModel.from_pretrained`, with its `_sanity_check`."""
        neuron_config = kwargs.get("neuron_config")
        continuous = neuron_config.continuous_batching if neuron_config else None
        if continuous:
            shared = continuous.batch_size_for_shared_caches
            expected = kwargs.get("batch_size")
            assert shared == expected, (
                f"invalid batch_size_for_shared_caches ({shared}), {expected} is expected"
            )
        max_n_pos = _max(kwargs.get("n_positions"))
        max_cle = _max(kwargs.get("context_length_estimate"))
        if max_n_pos is not None and max_cle is not None:
            assert max_n_pos >= max_cle, (
                f"Max context_length_estimate {max_cle} cannot be more than max n_positions "
                f"{max_n_pos}."
            )
        config = AutoConfig.from_pretrained(pretrained_model_path)
        model = cls(config, *model_args, **kwargs)
        model._checkpoint = _weights_dir(Path(pretrained_model_path))
        return model

    def load(self, directory: str) -> None:
        """base.py `load`: only remembers the directory; `to_neuron` reads it."""
        self._compiled_artifacts_directory = directory

    def save(self, directory: str) -> None:
        """base.py `save` -> `_save_compiled_artifacts`: one `<hash>.neff` per graph."""
        if os.path.isfile(directory):
            raise FileExistsError(
                f"Artifacts should be saved to a directory. Found existing file: {directory}"
            )
        os.makedirs(directory, exist_ok=True)
        kernels = self.program.get_kernels()  # AttributeError before `to_neuron`, as there
        for name, neff in kernels.items():
            Path(directory, name).write_bytes(neff)

    def to_neuron(self) -> None:
        """base.py `to_neuron`: load weights, then load the saved NEFFs or compile."""
        self._reference = self._load_weights()
        graphs = self._graphs()
        if hasattr(self, "_compiled_artifacts_directory"):
            self._load_compiled_artifacts(self._compiled_artifacts_directory, graphs)
        else:
            # base.py `compile`: one worker per graph unless `compilation_worker_count` is set.
            self.compile_workers = self.neuron_config.compilation_worker_count or len(graphs)
        self.program = _Program(graphs)
        longest = self.token_buckets[-1]
        self._slots = [[0] * longest for _ in range(self.batch_size)]

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor | None = None,
        start_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The module's `forward` (mistral/model.py:130-139)."""
        return self.forward(input_ids, cache_ids, start_ids)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor | None = None,
        start_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mistral/model.py `forward`: preprocess, run the graphs, postprocess."""
        assert self.program is not None, "call to_neuron() before running the model"
        assert cache_ids is not None and start_ids is not None, "continuous batching needs both"
        ids, positions, seq_ids = self._prepare_for_continuous_batching(
            input_ids, cache_ids, start_ids
        )
        if ids.shape[1] > 1:  # base.py `_forward`: context_length > 1 is context encoding
            logits = self._context(ids, positions, seq_ids)
        else:
            logits = self._decode(ids, positions)
        return self._postprocess(input_ids, logits, start_ids)

    def _prepare_for_continuous_batching(
        self, input_ids: torch.Tensor, cache_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """base.py `_prepare_for_continuous_batching` (:492-587)."""
        n_active_seqs, n_active_tokens = input_ids.shape
        batch_size = self.neuron_config.continuous_batching.batch_size_for_shared_caches
        first = cache_ids.flatten()[0].item()
        if n_active_tokens > 1 and first == 0:  # context encoding
            bucket = _find(self.context_buckets, n_active_tokens)
            assert n_active_seqs == cache_ids.shape[0], (
                f"invalid n_active_seqs ({n_active_seqs} vs {cache_ids.shape[0]})"
            )
            assert n_active_tokens <= bucket, (
                f"invalid input prompt length ({n_active_tokens} <= {bucket})"
            )
            cache_ids_pad = torch.zeros(n_active_seqs, bucket, dtype=cache_ids.dtype)
            for row in range(n_active_seqs):
                cache_ids_pad[row, :n_active_tokens] = cache_ids[row, :n_active_tokens]
            return input_ids, cache_ids_pad, seq_ids
        if n_active_tokens > 1:  # speculative forward: no speculation model is built
            raise AssertionError(f"invalid batch size for speculative forward ({n_active_seqs})")
        # Token generation: every slot runs; the buffers take the dtype of `input_ids`, so
        # `scatter_` raises for `cache_ids` of another dtype; a slot not in the call gets token
        # 0 at position 0.
        full_input_ids = torch.zeros(batch_size, 1, dtype=input_ids.dtype)
        full_cache_ids = torch.zeros(batch_size, 1, dtype=input_ids.dtype)
        full_seq_ids = torch.arange(batch_size, dtype=torch.int32)
        index = seq_ids.flatten().unsqueeze(-1).to(torch.int64)
        full_input_ids.scatter_(dim=0, index=index, src=input_ids)
        full_cache_ids.scatter_(dim=0, index=index, src=cache_ids)
        return full_input_ids, full_cache_ids, full_seq_ids

    def _context(
        self, input_ids: torch.Tensor, cache_ids: torch.Tensor, seq_ids: torch.Tensor
    ) -> torch.Tensor:
        """base.py `_prepare_for_par_ctx_rhs_padding` then `_context_dynamic_batching`: each
        row's last token is at `max(cache_ids[row])`; the prompt is right-padded with 0 to the
        bucket and written to positions 0..bucket-1 of slot `seq_ids[row]`, one row per call."""
        last_token_id = cache_ids.max(dim=1).values
        estimate = _find(self.context_buckets, input_ids.shape[1])
        padded = torch.nn.functional.pad(input_ids, (0, estimate - input_ids.shape[1]))
        rows = []
        for row, slot in enumerate(seq_ids.flatten().tolist()):
            self._slots[slot][:estimate] = padded[row].tolist()
            rows.append(self._logits(slot, int(last_token_id[row])))
        return torch.stack(rows)

    def _decode(self, input_ids: torch.Tensor, cache_ids: torch.Tensor) -> torch.Tensor:
        """The token-generation graph of the bucket holding the longest position (decoder.py
        `find_bucket_id`: StopIteration past the last bucket); it writes every slot."""
        longest = int(cache_ids.max().item())
        next(size for size in self.token_buckets if size >= longest + 1)
        for slot in range(input_ids.shape[0]):
            self._slots[slot][int(cache_ids[slot, 0])] = int(input_ids[slot, 0])
        return torch.stack(
            [self._logits(slot, int(cache_ids[slot, 0])) for slot in range(input_ids.shape[0])]
        )

    def _postprocess(
        self, input_ids: torch.Tensor, logits: torch.Tensor, start_ids: torch.Tensor
    ) -> torch.Tensor:
        """base.py `_postprocess` (:613-639): prefill rows in input order; decode rows are the
        slots named by `start_ids`, in that order. Float32 `[rows, vocab]` (base.py `_forward`)."""
        if input_ids.shape[-1] > 1:
            return logits
        return logits[start_ids.flatten().to(torch.long)]

    def _logits(self, slot: int, position: int) -> torch.Tensor:
        tokens = torch.tensor([self._slots[slot][: position + 1]])
        return self._reference(input_ids=tokens).logits[0, -1].float()

    def _load_weights(self) -> Any:
        """The checkpoint on the CPU, with the RoPE base this library read from the config."""
        assert self._checkpoint is not None
        config = AutoConfig.from_pretrained(self._checkpoint)
        config.rope_parameters = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        model = AutoModelForCausalLM.from_pretrained(
            self._checkpoint, config=config, dtype=torch.float32
        )
        return model.eval()

    def _graphs(self) -> dict[str, bytes]:
        """One graph per context bucket (batch 1) and per token bucket (every slot); named as
        base.py `hash_hlo` names NEFFs: the first 20 hex digits of the graph's sha256."""
        shape = {
            "model": self.config.to_dict(),
            "rope_theta": self.rope_theta,
            "amp": self.amp,
            "tp_degree": self.tp_degree,
        }
        graphs = [("context", size, 1) for size in self.context_buckets]
        graphs += [("token", size, self.batch_size) for size in self.token_buckets]
        named = {}
        for kind, size, batch in graphs:
            hlo = json.dumps({**shape, "kind": kind, "size": size, "batch": batch}, default=str)
            named[hashlib.sha256(hlo.encode()).hexdigest()[:20] + ".neff"] = hlo.encode()
        return named

    def _load_compiled_artifacts(self, directory: str, graphs: dict[str, bytes]) -> None:
        """base.py `_load_compiled_artifacts` and `set_neff_bytes`: a graph whose NEFF is missing
        (another model, batch size, bucket list or tp degree) is a FileNotFoundError."""
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Did not find directory: {directory}.")
        for name in graphs:
            if not Path(directory, name).is_file():
                raise FileNotFoundError(
                    "Could not find a matching NEFF for your HLO in this directory. Ensure that "
                    "the model you are trying to load is the same type and has the same "
                    'parameters as the one you saved or call "save" on this model to '
                    "reserialize it."
                )


def _max(value: int | list[int] | None) -> int | None:
    if value is None:
        return None
    return max(value) if isinstance(value, list) else value


def _weights_dir(path: Path) -> Path:
    """module.py `load_state_dict_dir`: safetensors or a PyTorch checkpoint must be there."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((path / name).exists() for name in names):
        raise FileNotFoundError(f"Can not find model.safetensors or pytorch_model.bin in {path}")
    return path
