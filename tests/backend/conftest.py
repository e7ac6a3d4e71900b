"""Fixtures for serving tests: the real model server and routes over a scripted engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from backend.ingress.routes import build_api
from backend.replica.model_server import ModelServer
from backend.settings import BackendSettings
from tests.fakes import Script, scripted_engine
from tests.mistral_checkpoint import build_checkpoint


@pytest.fixture
def script() -> Script:
    """The fake engine's script for one test."""
    return Script()


@pytest.fixture
def settings() -> BackendSettings:
    """Small limits so that limit checks are cheap to reach."""
    return BackendSettings(max_tokens_cap=32, default_max_tokens=16, max_request_bytes=4096)


@pytest.fixture
async def server(script: Script, settings: BackendSettings) -> ModelServer:
    """A loaded model server over the scripted engine."""
    model_server = ModelServer(settings, scripted_engine(script))
    await model_server.start()
    return model_server


@pytest.fixture
async def client(
    server: ModelServer, settings: BackendSettings
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the FastAPI routes in-process."""
    transport = httpx.ASGITransport(app=build_api(server, settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://backend") as http:
        yield http


@pytest.fixture(scope="session")
def mistral_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint in Mistral-7B-Instruct-v0.2's formats (tokenizer, template, config)."""
    return build_checkpoint(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_checkpoint: Path) -> PreTrainedTokenizerBase:
    """Its SentencePiece tokenizer, loaded as the engines load it."""
    return AutoTokenizer.from_pretrained(mistral_checkpoint)
