"""Backend configuration: every knob is an `LLM_*` environment variable, validated once at start."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.protocol import MAX_CHOICES

logger = logging.getLogger(__name__)

# Old setting name -> new one (both without the LLM_ prefix).
_RENAMED = {"torch_threads": "cpu_threads", "prefill_chunk_tokens": "max_num_batched_tokens"}


class BackendSettings(BaseSettings):
    """Settings of the serving backend (env prefix `LLM_`)."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")

    host: str = Field("127.0.0.1", description="`python -m backend`: HTTP bind address.")
    port: int = Field(8000, ge=1, le=65535, description="`python -m backend`: HTTP port.")
    metrics_port: int = Field(
        8080, ge=1, le=65535, description="`python -m backend`: Ray's Prometheus metrics port."
    )
    # The default CPU engine: the faster of the two on the CPU (`make bench` compares them).
    engine: str = Field(
        "llamacpp",
        description="Engine: `llamacpp` (llama.cpp, CPU, GGUF), `hf` (transformers, CPU), "
        "`neuron` (Inf2, transformers-neuronx) or `nxdi` (Inf2, NxD Inference); plugins add more.",
    )
    model: str = Field(
        "",
        description="Local model directory or Hugging Face hub id (`llamacpp`: a local .gguf "
        "file); empty = embedded SmolLM2-135M.",
    )
    tokenizer: str = Field(
        "",
        description="`llamacpp`: Hugging Face tokenizer (directory or hub id) to use instead of "
        "the one in the GGUF; empty = read it from the GGUF.",
    )
    served_model_name: str = Field(
        "", description="Model id reported by the API; empty = derived from `LLM_MODEL`."
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="Weights dtype; `auto` = bf16 where the CPU has native bf16, else fp32."
    )
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Streams decoded together in one forward pass."
    )
    max_context_len: int = Field(
        0,
        ge=0,
        description="Context window in tokens (prompt + reply); 0 = the model's own limit.",
    )
    prefix_caching: bool = Field(
        True,
        description="Keep finished turns' KV and start a request from the longest token prefix "
        "an engine still holds (`llamacpp`, `hf`; `neuron` and `nxdi` have none); `false` = "
        "prefill every prompt from its first token.",
    )
    kv_cache_gib: float = Field(
        0,
        ge=0,
        description="Memory of the KV cache, running and parked, in GiB (`llamacpp`: allocated "
        "at start, each sequence an equal window capped by the context length; `hf`: parked "
        "prefixes, then the youngest stream, give way beyond it); 0 = a quarter of the memory "
        "this process may use, at most 2 GiB.",
    )
    prompt_cache_gib: float = Field(
        1,
        ge=0,
        description="Host memory, in GiB, for finished conversations' KV beyond what the "
        "engine's sequences hold (least recently used dropped first); 0 = none.",
    )
    max_num_batched_tokens: int = Field(
        0,
        ge=0,
        description="Tokens one step computes, decode tokens and prompt chunks together (vLLM's "
        "`max_num_batched_tokens`): a longer prompt goes in chunks over several steps "
        "(`llamacpp` in the same forward pass as the decode tokens, `hf` in its own), or waits "
        "for a step of its own (`neuron`, whole prompts only). 0 = the engine's own (`llamacpp` "
        "32, `hf` and `neuron` 256); else at least the batch size.",
    )
    # Every item a stream sends costs the ingress and Ray's proxy CPU, taken from the model's
    # cores: merging a stream's text gives tokens/s back and keeps health probes quick under
    # load. 50 ms is 20 updates/s, still smooth to read.
    stream_interval_ms: float = Field(
        50,
        ge=0,
        le=1000,
        description="A stream's first text is sent at once, later text at most every this many "
        "ms, merged (fewer, larger SSE chunks: less CPU per token); 0 = every decode step.",
    )
    # Each item costs about the same CPU whatever its length, so it is the items per second of
    # all streams together that take the model's cores: with many streams, each stream's text
    # goes out less often (coarser text at high load) and the tokens/s stay.
    stream_updates_per_s: float = Field(
        40,
        ge=0,
        description="Most stream items a replica sends per second, all streams together: with "
        "more streams than `LLM_STREAM_INTERVAL_MS` allows within it, each stream's interval "
        "grows (8 streams: 200 ms); 0 = no bound.",
    )
    max_tokens_cap: int = Field(
        2048, ge=1, description="Largest `max_tokens` a request may ask for."
    )
    max_choices: int = Field(
        8,
        ge=1,
        le=MAX_CHOICES,
        description="Largest `n` (choices per request); the choices share the prompt's prefill "
        "and each takes a batch slot.",
    )
    default_max_tokens: int = Field(
        512, ge=1, description="`max_tokens` when the request does not set it."
    )
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest accepted request body (HTTP 413 above)."
    )
    chat_template: FilePath | None = Field(
        None,
        description="A Jinja chat template file used instead of the tokenizer's own (as vLLM's "
        "--chat-template); a template with a tool-call format of its own gets it used.",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "mistral-inf2-chat",
        description="Converted model weights (GGUF -> safetensors) and GGUF tokenizers, for "
        "fast restarts.",
    )
    cpu_threads: int = Field(
        0,
        ge=0,
        description="CPU engines: the threads computing the model (torch's for `hf`, llama.cpp's "
        "for `llamacpp`); 0 = the cores Ray grants. Formerly LLM_TORCH_THREADS (still read).",
    )
    tp_degree: int = Field(2, ge=1, description="Neuron: tensor-parallel degree (NeuronCores).")
    neuron_artifacts_dir: Path | None = Field(
        None,
        description="Neuron: compiled-model directory; loaded when present, written after compile.",
    )
    neuron_compile_workers: int = Field(
        4, ge=1, description="Neuron: parallel compiler processes (each takes several GiB)."
    )
    neuron_transformers: str = Field(
        ">=4.36,<4.48",
        description="Neuron: transformers versions the engine accepts (transformers-neuronx "
        "0.13 misreads Mistral's config with newer ones).",
    )
    num_cpus: float | None = Field(
        None,
        ge=0,
        description="Ray CPUs of the model deployment (its torch threads); unset = all cores.",
    )
    num_neuron_cores: int = Field(
        0, ge=0, description="Ray `neuron_cores` resource of the model deployment (2 on Inf2)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests a model replica accepts (queue beyond batch)."
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests waiting for a replica before HTTP 503 (-1 = no limit; else >= 1).",
    )
    num_replicas: int = Field(
        1, ge=1, description="Model deployment replicas (with max_replicas: the minimum)."
    )
    max_replicas: int | None = Field(
        None,
        ge=1,
        description="Ray Serve autoscales the model deployment between num_replicas and this, "
        "aiming at max_batch_size ongoing requests per replica; unset = num_replicas, fixed.",
    )
    health_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds `/healthz` waits for Ray's controller (or, once, the model replica).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key(s), comma-separated, every route but /healthz requires; "
        "unset = no authentication.",
    )
    api_key_file: Path | None = Field(
        None,
        description="A file holding LLM_API_KEY's value (a mounted Secret); read at start, "
        "instead of LLM_API_KEY.",
    )

    @field_validator("api_key")
    @classmethod
    def _keys_or_none(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty variable (e.g. an empty Secret) must not pass for a key nobody can send.
        if value is None or not _split_keys(value.get_secret_value()):
            return None
        return value

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_length(cls, value: int) -> int:
        # Ray Serve refuses a zero-length queue at deploy time, far from the setting.
        if value == 0:
            raise ValueError("must be -1 (no limit) or at least 1: Ray Serve has no empty queue")
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        """Settings given under an old name still count, with a warning naming the new one."""
        if not isinstance(values, dict):
            return values
        for old, new in _RENAMED.items():
            given = values.pop(old) if old in values else os.environ.get(f"LLM_{old.upper()}")
            if given is not None:
                logger.warning("LLM_%s is deprecated: set LLM_%s", old.upper(), new.upper())
                values.setdefault(new, given)
        return values

    @model_validator(mode="after")
    def _key_from_file(self) -> BackendSettings:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("set LLM_API_KEY or LLM_API_KEY_FILE, not both")
        try:
            raw = self.api_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"LLM_API_KEY_FILE cannot be read: {exc}") from exc
        if not _split_keys(raw):
            raise ValueError(f"LLM_API_KEY_FILE ({self.api_key_file}) holds no key")
        self.api_key = SecretStr(raw)
        return self

    @model_validator(mode="after")
    def _step_holds_the_batch(self) -> BackendSettings:
        if 0 < self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_batch_size ({self.max_batch_size}): every running stream decodes each step"
            )
        return self

    @model_validator(mode="after")
    def _replica_range(self) -> BackendSettings:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be at least num_replicas "
                f"({self.num_replicas}): raise LLM_MAX_REPLICAS or lower LLM_NUM_REPLICAS"
            )
        return self

    def api_keys(self) -> tuple[str, ...]:
        """The accepted bearer keys (empty: authentication is off)."""
        return _split_keys(self.api_key.get_secret_value()) if self.api_key else ()

    def model_cpus(self) -> float:
        """CPUs the model replica reserves: the setting, or every core of this machine."""
        return self.num_cpus if self.num_cpus is not None else float(os.cpu_count() or 1)


def _split_keys(raw: str) -> tuple[str, ...]:
    return tuple(key for key in (part.strip() for part in raw.split(",")) if key)


@lru_cache(maxsize=1)
def get_settings() -> BackendSettings:
    """The process-wide settings, read from the environment once."""
    return BackendSettings()
