"""The two llama.cpp baselines of `make bench`: the raw batch API, and llama-cpp-python's server.

`raw_llamacpp_run` drives llama.cpp's low-level API directly, the way our `llamacpp` engine does
but with nothing of ours in between (no batching loop, no sampling module, no server): it is the
ceiling our HTTP throughput is compared with. `llamacpp_server` runs the OpenAI server that ships
with llama-cpp-python (`llama_cpp.server`, the `[server]` extra), the tool a CPU user would
otherwise pick, loading weights as our engine does (`bench.llamacpp_server`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp as llama
import numpy as np

from backend.engines.llamacpp_runner import model_params, single_token_threads
from harness.services import ARTIFACTS, REPO, free_port


@llama.llama_log_callback
def _quiet(_level: int, _text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load at length on stderr; a benchmark table needs none of it."""


def raw_llamacpp_run(
    gguf_path: Path, prompt_ids: list[int], batch: int, max_tokens: int, n_threads: int
) -> tuple[int, float]:
    """Greedy-decode `max_tokens` for `batch` copies of a prompt; (completion tokens, seconds).

    One context with `batch` sequences, each in its own KV stream (as the engine configures
    it); each prompt is prefilled into its own sequence id (one `llama_decode` per sequence, as
    requests arrive one by one), then every step is one `llama_batch` with one token of every
    sequence; the next token is the argmax of its logits. End-of-generation tokens are not
    special (like `ignore_eos`). The time covers prefill and decode, not loading the model.
    """
    llama.llama_log_set(_quiet, ctypes.c_void_p(0))
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(str(gguf_path).encode(), model_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    params = llama.llama_context_default_params()
    params.n_seq_max = batch
    params.kv_unified = False
    params.n_ctx = (len(prompt_ids) + max_tokens) * batch
    params.n_batch = params.n_ubatch = max(512, len(prompt_ids), batch)
    params.n_threads_batch = n_threads
    params.n_threads = single_token_threads(n_threads)  # as the engine sets them
    ctx = llama.llama_init_from_model(model, params)
    capacity = int(params.n_batch)
    llama_batch = llama.llama_batch_init(capacity, 0, 1)
    try:
        return _timed_generation(ctx, llama_batch, n_vocab, prompt_ids, batch, max_tokens)
    finally:
        llama.llama_batch_free(llama_batch)
        llama.llama_free(ctx)
        llama.llama_model_free(model)


def _timed_generation(
    ctx: llama.llama_context_p,
    llama_batch: llama.llama_batch,
    n_vocab: int,
    prompt_ids: list[int],
    batch: int,
    max_tokens: int,
) -> tuple[int, float]:
    def submit(tokens: list[int], positions: list[int], seqs: list[int], outputs: int) -> None:
        for i, (token, pos, seq) in enumerate(zip(tokens, positions, seqs, strict=True)):
            llama_batch.token[i] = token
            llama_batch.pos[i] = pos
            llama_batch.n_seq_id[i] = 1
            llama_batch.seq_id[i][0] = seq
            llama_batch.logits[i] = i >= len(tokens) - outputs
        llama_batch.n_tokens = len(tokens)
        if llama.llama_decode(ctx, llama_batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(rows: int) -> list[int]:
        logits = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(rows, n_vocab))
        return logits.argmax(axis=1).tolist()

    # Warm-up (graph allocation, page faults of the weights), then a clean memory.
    submit(prompt_ids[:8], list(range(min(8, len(prompt_ids)))), [0] * min(8, len(prompt_ids)), 1)
    llama.llama_memory_clear(llama.llama_get_memory(ctx), True)

    n = len(prompt_ids)
    start = time.perf_counter()
    last = []
    for seq in range(batch):
        submit(prompt_ids, list(range(n)), [seq] * n, 1)
        last += argmax(1)
    generated = batch
    for step in range(max_tokens - 1):
        submit(last, [n + step] * batch, list(range(batch)), batch)
        last = argmax(batch)
        generated += batch
    return generated, time.perf_counter() - start


@contextlib.contextmanager
def llamacpp_server(
    gguf_path: Path,
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    port: int | None = None,
    timeout_s: float = 120,
) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on `gguf_path`; yields its base URL once it answers.

    Configured as a careful user would: all our threads, flash attention as our engine gets it
    (llama.cpp's `auto` turns it on on the CPU), logits of the last token only, and concurrent
    requests queued rather than interrupting each other (its default interrupts the running one).
    It serves one request at a time: concurrent streams wait for each other.
    """
    port = port or free_port()
    threads = n_threads or len(os.sched_getaffinity(0))
    command = [
        sys.executable,
        "-m",
        "bench.llamacpp_server",
        "--model",
        str(gguf_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(single_token_threads(threads)),  # as our engine splits them
        "--n_threads_batch",
        str(threads),
        "--flash_attn",
        "True",
        "--logits_all",
        "False",
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    log_path = ARTIFACTS / "llamacpp-server.log"
    with served(command, port, "llama_cpp.server", log_path, timeout_s) as url:
        yield url


@contextlib.contextmanager
def served(
    command: list[str], port: int, name: str, log_path: Path, timeout_s: float
) -> Iterator[str]:
    """An OpenAI-compatible server started by `command` on `port`, logging to `log_path`;
    yields its base URL once `/v1/models` answers, and stops it afterwards."""
    ARTIFACTS.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_until_ready(process, url + "/v1/models", timeout_s, name, log_path)
            yield url
        finally:
            stop(process)


def wait_until_ready(
    process: subprocess.Popen[bytes], url: str, timeout_s: float, name: str, log: Path
) -> None:
    """Return once `url` answers 200; raise if the server `name` exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited early; see {log.relative_to(REPO)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{name} did not answer within {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (a server's clean exit), SIGKILL if it lingers, then its whole process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
