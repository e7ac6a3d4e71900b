"""Backend settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.settings import BackendSettings


def test_defaults_serve_the_embedded_model_on_cpu() -> None:
    settings = BackendSettings()
    assert (settings.engine, settings.model, settings.port) == ("llamacpp", "", 8000)
    assert settings.max_ongoing_requests > settings.max_batch_size  # room to queue beyond a batch


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ENGINE", "neuron")
    monkeypatch.setenv("LLM_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("LLM_DTYPE", "bfloat16")
    settings = BackendSettings()
    assert (settings.engine, settings.max_batch_size, settings.dtype) == ("neuron", 16, "bfloat16")


@pytest.mark.parametrize(
    ("name", "value"),
    [("LLM_MAX_BATCH_SIZE", "0"), ("LLM_DTYPE", "int3"), ("LLM_MAX_QUEUED_REQUESTS", "0")],
)
def test_invalid_values_are_rejected_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("LLM_").lower()):
        BackendSettings()


@pytest.mark.parametrize(
    ("raw", "keys"),
    [("one", ("one",)), (" one , two,,three ", ("one", "two", "three")), ("", ()), (" , ", ())],
)
def test_api_keys_are_a_comma_separated_list_and_empty_means_open(
    monkeypatch: pytest.MonkeyPatch, raw: str, keys: tuple[str, ...]
) -> None:
    monkeypatch.setenv("LLM_API_KEY", raw)
    settings = BackendSettings()
    assert settings.api_keys() == keys
    assert (settings.api_key is None) == (keys == ())


def test_api_keys_can_come_from_a_mounted_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "api-key"
    secret.write_text("one,two\n")  # as `kubectl create secret --from-file` leaves it
    monkeypatch.setenv("LLM_API_KEY_FILE", str(secret))
    assert BackendSettings().api_keys() == ("one", "two")
    secret.write_text(" \n")
    with pytest.raises(ValidationError, match="holds no key"):
        BackendSettings()
    with pytest.raises(ValidationError, match="cannot be read"):
        BackendSettings(api_key_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="not both"):
        BackendSettings(api_key="one", api_key_file=secret)


def test_max_replicas_below_num_replicas_is_rejected() -> None:
    with pytest.raises(ValidationError, match="LLM_MAX_REPLICAS"):
        BackendSettings(num_replicas=3, max_replicas=2)


def test_a_renamed_setting_is_still_read_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LLM_TORCH_THREADS", "3")
    assert BackendSettings().cpu_threads == 3
    assert "LLM_TORCH_THREADS is deprecated: set LLM_CPU_THREADS" in caplog.text
    monkeypatch.setenv("LLM_CPU_THREADS", "2")  # the new name wins
    assert BackendSettings().cpu_threads == 2
    monkeypatch.delenv("LLM_CPU_THREADS")
    assert BackendSettings(torch_threads=5).cpu_threads == 5  # the old name in serve config args
