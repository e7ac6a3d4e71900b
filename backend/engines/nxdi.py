"""The `nxdi` engine: Mistral-7B-Instruct on Inferentia2 through NxD Inference (NxDI 0.8, Neuron
SDK 2.28, the last release whose models run on Inf2).

NxDI 0.8 runs Mistral with its Llama architecture (`NeuronLlamaForCausalLM`; its `models/mistral`
came with 0.9, for Trn2 only). The model is compiled for continuous batching: one
context-encoding graph per length bucket for one prompt at a time (`ctx_batch_size=1`), one
token-generation graph per bucket for the whole batch, one KV row per `seq_id`. On-device
sampling is off: the graphs return logits, so the loop's sampler applies grammars, penalties,
log-probabilities and `n` as on the CPU. `compile` writes the graphs into
`LLM_NEURON_ARTIFACTS_DIR` once (`ArtifactStore`); every start `load`s them from there.

No prefix caching: NxDI's prefix caching (a block KV layout whose block tables the caller keeps)
is not documented for Inf2 at 0.8, so every prompt is encoded from position 0.

NxDI is imported only in `_load`, so this module imports on any machine.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from backend.engines.base import register_engine
from backend.engines.neuron_artifacts import ArtifactStore
from backend.engines.neuron_common import (
    DEFAULT_MODEL,
    CompiledNeuronEngine,
    SlotRunner,
    installed_version,
    length_buckets,
)
from backend.errors import EngineError

logger = logging.getLogger(__name__)


def _int32(rows: list[Any]) -> torch.Tensor:
    """The compiled graphs take int32 (NxDI converts only int64, model_wrapper.py)."""
    return torch.tensor(rows, dtype=torch.int32)


class NxdiSlotRunner(SlotRunner):
    """`SlotRunner` over NxDI continuous batching; a sequence's slot index is its `seq_id`."""

    def _forward(
        self, tokens: list[list[int]], positions: list[list[int]], slots: list[int]
    ) -> torch.Tensor:
        # A decode batch of every slot runs as given, row i on KV row i whatever its seq_id
        # (model_wrapper.py pads and sorts smaller batches only), so rows go in ascending
        # seq_id order, as vLLM's Neuron loader sorts them, and come back in the caller's.
        order = sorted(range(len(slots)), key=slots.__getitem__)
        output = self._model(
            input_ids=_int32([tokens[i] for i in order]),
            position_ids=_int32([positions[i] for i in order]),
            seq_ids=_int32([slots[i] for i in order]),
        )
        logits = output.logits[:, -1, :]
        return logits[torch.tensor(order).argsort()]


@register_engine
class NxdiEngine(CompiledNeuronEngine):
    """NxD Inference `NeuronLlamaForCausalLM` on NeuronCores (`LLM_TP_DEGREE`, default 2)."""

    name = "nxdi"
    runner_class = NxdiSlotRunner

    def neuron_config(self, context: int) -> dict[str, Any]:
        """NxDI's `NeuronConfig` keywords (JSON: they are also the compile's marker)."""
        batch = self.settings.max_batch_size
        return {
            "tp_degree": self.settings.tp_degree,
            "batch_size": batch,  # the KV cache's rows
            "ctx_batch_size": 1,
            "tkg_batch_size": batch,
            "is_continuous_batching": True,
            # Every admitted prompt fits a context-encoding bucket; positions stay below seq_len.
            "max_context_length": context,
            "seq_len": context,
            "enable_bucketing": True,
            "context_encoding_buckets": length_buckets(context),
            "token_generation_buckets": length_buckets(context),
            "torch_dtype": "bfloat16",
            "on_device_sampling_config": None,
        }

    def _config(self, path: Path, context: int) -> Any:
        from neuronx_distributed_inference.models.config import NeuronConfig
        from neuronx_distributed_inference.models.llama.modeling_llama import (
            LlamaInferenceConfig,
        )
        from neuronx_distributed_inference.utils.hf_adapter import load_pretrained_config
        from transformers import AutoConfig

        # RoPE's base is the attribute `rope_theta` to NxDI; transformers 5 keeps it in
        # `rope_parameters` instead, so it is passed explicitly (1e6 for Mistral-7B v0.2).
        theta = _rope_theta(AutoConfig.from_pretrained(path))
        return LlamaInferenceConfig(
            NeuronConfig(**self.neuron_config(context)),
            load_config=load_pretrained_config(str(path)),
            rope_theta=theta,
        )

    def _compiled_model(self, path: Path, context: int) -> Any:
        root = self.settings.neuron_artifacts_dir
        if root is None:  # compiled for this start only
            with tempfile.TemporaryDirectory(prefix="nxdi-") as scratch:
                self._compile(path, context, Path(scratch))
                return self._load_compiled(Path(scratch))
        store = ArtifactStore(root, self._marker(path, context))
        store.log_foreign()
        published = store.find()
        if published is None:
            with store.compiling() as published:  # waits while another replica compiles
                if published is None:
                    published = store.publish(lambda staging: self._compile(path, context, staging))
        try:
            return self._load_compiled(published)
        except Exception as exc:
            raise EngineError(
                f"Loading the compiled model from {published} failed: {exc}. "
                f"Delete {published} to compile again."
            ) from exc

    def _compile(self, path: Path, context: int, target: Path) -> None:
        """Trace and compile every bucket's graph into `target` (many minutes on Inf2)."""
        from neuronx_distributed_inference.models.llama.modeling_llama import (
            NeuronLlamaForCausalLM,
        )

        logger.info("compiling %s for NxD Inference into %s", path, target)
        NeuronLlamaForCausalLM(str(path), self._config(path, context)).compile(str(target))

    def _load_compiled(self, compiled: Path) -> Any:
        """The model as compiled (its config is the one saved beside the graphs); the weights
        are sharded from the checkpoint the config names."""
        from neuronx_distributed_inference.models.llama.modeling_llama import (
            NeuronLlamaForCausalLM,
        )

        model = NeuronLlamaForCausalLM(str(compiled))
        model.load(str(compiled))
        return model

    def _marker(self, path: Path, context: int) -> dict[str, Any]:
        """What a compile depends on; artifacts with another marker are never loaded."""
        import neuronx_distributed_inference

        return {
            "model": self.settings.model or DEFAULT_MODEL,
            "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "neuron_config": self.neuron_config(context),
            "nxdi": getattr(neuronx_distributed_inference, "__version__", "unknown"),
            "neuronx_cc": installed_version("neuronx-cc"),
        }


def _rope_theta(config: Any) -> float:
    """The checkpoint's RoPE base, whichever transformers read its config."""
    theta = getattr(config, "rope_theta", None)
    return float(theta if theta is not None else config.rope_parameters["rope_theta"])
