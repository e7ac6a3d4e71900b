"""The `neuron` engine: Mistral-7B-Instruct on Inferentia2 through transformers-neuronx.

The model is compiled in transformers-neuronx's continuous-batching mode: `max_batch_size` KV-cache
slots, each sequence owning one slot from its prefill until it leaves. The same batching loop as on
the CPU drives it through `NeuronSlotRunner`. Compiled kernels are saved to
`LLM_NEURON_ARTIFACTS_DIR` after the first compile and loaded from there on later starts, so
replicas do not recompile (the blueprint's ~10 minute cold start).

The Neuron SDK is imported only in `_load`, so this module imports on any machine. Runs on the
Neuron image's Python 3.10 and transformers 4.x.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from packaging.specifiers import SpecifierSet

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

_AMP = "bf16"
# The transformers release the serve image installs beside transformers-neuronx 0.13.1216.
PINNED_TRANSFORMERS = "4.47.1"


def _ids(values: list[Any]) -> torch.Tensor:
    """Tokens, positions and slots all int64: the library pads a decode batch with buffers of
    the tokens' dtype and `scatter_`s positions into them, which fails on any other dtype
    (`_prepare_for_continuous_batching`); vLLM's Neuron runner passes int64 too."""
    return torch.tensor(values, dtype=torch.int64)


class NeuronSlotRunner(SlotRunner):
    """`SlotRunner` over transformers-neuronx continuous batching.

    No prefix caching: 0.13 takes a multi-token call as context encoding only when its positions
    start at 0 (base.py `_prepare_for_continuous_batching`), and has no way to extend a slot's
    prompt except token by token.
    """

    def _forward(
        self, tokens: list[list[int]], positions: list[list[int]], slots: list[int]
    ) -> torch.Tensor:
        # Tokens and positions [rows, n] (2-D, as continuous batching requires); the library
        # pads a prompt to its bucket itself and returns decode rows in `start_ids` order.
        logits = self._model(_ids(tokens), cache_ids=_ids(positions), start_ids=_ids(slots))
        return logits


@register_engine
class NeuronEngine(CompiledNeuronEngine):
    """transformers-neuronx `MistralForSampling` on NeuronCores (`LLM_TP_DEGREE`, default 2)."""

    name = "neuron"
    runner_class = NeuronSlotRunner

    def _check_environment(self) -> None:
        import transformers

        check_transformers(transformers.__version__, self.settings.neuron_transformers)

    def _compiled_model(self, path: Path, context: int) -> Any:
        root = self.settings.neuron_artifacts_dir
        if root is None:
            return self._build(path, context, load_from=None)
        store = ArtifactStore(root, self._marker(path, context))
        store.log_foreign()
        published = store.find()
        if published is None:
            with store.compiling() as published:  # waits while another replica compiles
                if published is None:
                    model = self._build(path, context, load_from=None)
                    store.publish(lambda staging: model.save(str(staging)))
                    return model
        return self._load_published(path, context, published)

    def _load_published(self, path: Path, context: int, published: Path) -> Any:
        try:
            return self._build(path, context, load_from=published)
        except Exception as exc:
            # The weights may already be on the NeuronCores: a second model beside them would
            # not fit, so this replica fails and Ray starts a fresh one.
            raise EngineError(
                f"Loading the compiled model from {published} failed: {exc}. "
                f"Delete {published} to compile again."
            ) from exc

    def _marker(self, path: Path, context: int) -> dict[str, Any]:
        """What a compile depends on; artifacts with another marker are never loaded."""
        import transformers_neuronx

        return {
            "model": self.settings.model or DEFAULT_MODEL,
            "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "tp_degree": self.settings.tp_degree,
            "batch_size": self.settings.max_batch_size,
            "buckets": length_buckets(context),
            "amp": _AMP,
            "transformers_neuronx": getattr(transformers_neuronx, "__version__", "unknown"),
            "neuronx_cc": installed_version("neuronx-cc"),
        }

    def _build(self, path: Path, context: int, load_from: Path | None) -> Any:
        from transformers_neuronx import ContinuousBatchingConfig, MistralForSampling, NeuronConfig

        batch = self.settings.max_batch_size
        buckets = length_buckets(context)
        model = MistralForSampling.from_pretrained(
            str(path),
            batch_size=batch,
            n_positions=buckets,
            context_length_estimate=buckets,
            tp_degree=self.settings.tp_degree,
            amp=_AMP,
            neuron_config=NeuronConfig(
                continuous_batching=ContinuousBatchingConfig(batch_size_for_shared_caches=batch),
                # One compiler process per graph by default: 12 buckets would exhaust the pod.
                compilation_worker_count=self.settings.neuron_compile_workers,
            ),
        )
        if load_from is not None:
            model.load(str(load_from))
        model.to_neuron()  # loads the artifacts set by `load`, else compiles (many minutes)
        return model


def check_transformers(installed: str, supported: str) -> None:
    """Refuse a transformers release transformers-neuronx would silently misread."""
    if SpecifierSet(supported).contains(installed, prereleases=True):
        return
    raise EngineError(
        f"transformers {installed} is installed, but the neuron engine needs {supported}. "
        "transformers-neuronx reads Mistral's `rope_theta` as a config attribute; newer "
        "transformers releases keep it elsewhere, and the model would compile with RoPE base "
        "10000 instead of 1e6 and answer wrongly without any error. Install the version the "
        f"serve image pins (transformers=={PINNED_TRANSFORMERS}), or widen "
        "LLM_NEURON_TRANSFORMERS if you have checked another one."
    )
