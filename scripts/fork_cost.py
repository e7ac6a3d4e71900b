"""What `LlamaCppRunner.fork` costs on the embedded model: the old copy through host memory
against the on-device copy the runner makes now, side by side in one run (not a unit test).

    PYTHONPATH=. .venv/bin/python scripts/fork_cost.py [--n-ctx-seq 4096] [--repeats 5]

For each prompt length and n (choices), one parent is prefilled, its n - 1 children forked, and
one decode step of all n taken; the children are then emptied and it all repeats. Printed are
the median milliseconds per child of the forks alone, of the forks plus that first step (a
`llama_memory_seq_cp` fork costs nothing until then), and the bytes each child's fork moves.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from backend.engines.embedded import embedded_gguf_path
from backend.engines.llamacpp_runner import _ON_DEVICE, LlamaCppRunner, LlamaModel, llama


def host_fork(runner: LlamaCppRunner, parent_id: int, child_id: int) -> int:
    """The runner's fork before: serialised to host memory and back, once per child."""
    parent = runner.slots.of(parent_id)
    assert parent is not None
    state, size = runner._state(parent)
    slot = runner.slots.least_recently_used()
    runner._trim(slot, 0)
    assert llama.llama_state_seq_set_data(runner._ctx, state, size, slot.index)
    slot.tokens = list(parent.tokens)
    runner.slots.lend(slot, child_id)
    return 2 * size  # written to host memory, then read back


def device_fork(runner: LlamaCppRunner, parent_id: int, child_id: int) -> int:
    """The runner's fork now (bytes: its share of one get, and its own set)."""
    first = runner._staged is None
    assert runner.fork(parent_id, child_id)
    parent = runner.slots.of(parent_id)
    assert parent is not None
    kv = int(llama.llama_state_seq_get_size(runner._ctx, parent.index))
    meta = int(llama.llama_state_seq_get_size_ext(runner._ctx, parent.index, _ON_DEVICE))
    return kv * (2 if first else 1) + (meta if first else 0)


def seq_cp_fork(runner: LlamaCppRunner, parent_id: int, child_id: int) -> int:
    """For reference, unsafe as it stands: a queued copy of the whole stream (see `fork`)."""
    parent = runner.slots.of(parent_id)
    assert parent is not None
    slot = runner.slots.least_recently_used()
    runner._trim(slot, 0)
    llama.llama_memory_seq_cp(runner._memory, parent.index, slot.index, -1, -1)
    slot.tokens = list(parent.tokens)
    runner.slots.lend(slot, child_id)
    return stream_bytes(runner)


def stream_bytes(runner: LlamaCppRunner) -> int:
    """One KV stream, every cell (f16 K and V of every layer)."""
    model = runner._model.handle
    n_head = llama.llama_model_n_head(model)
    kv_dim = llama.llama_model_n_embd(model) // n_head * llama.llama_model_n_head_kv(model)
    return int(llama.llama_model_n_layer(model)) * runner.n_ctx_seq * kv_dim * 2 * 2


Fork = Callable[[LlamaCppRunner, int, int], int]


def measure(runner: LlamaCppRunner, fork: Fork, n: int, repeats: int) -> tuple[float, float, int]:
    """Median ms per child of the forks, and of the forks plus the next step; bytes per child."""
    forks, totals = [], []
    moved = 0
    token = 1000
    for _ in range(repeats):
        start = time.perf_counter()
        moved = sum(fork(runner, 0, child) for child in range(1, n))
        forked = time.perf_counter()
        runner.decode(list(range(n)), [token] * n)
        stepped = time.perf_counter()
        forks.append((forked - start) / (n - 1))
        totals.append((stepped - start) / (n - 1))
        for child in range(1, n):
            runner.release(child)
        parent = runner.slots.of(0)
        assert parent is not None
        runner._trim(parent, len(parent.tokens) - 1)  # the step's token out again
    ms = 1000 * statistics.median(forks), 1000 * statistics.median(totals)
    return ms[0], ms[1], moved // (n - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-ctx-seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = LlamaModel(embedded_gguf_path())
    runner = LlamaCppRunner(model, n_seq_max=4, n_ctx_seq=args.n_ctx_seq, n_threads=1)
    methods: dict[str, Fork] = {"host": host_fork, "device": device_fork, "seq_cp": seq_cp_fork}
    print(f"SmolLM2-135M Q4_1, n_ctx_seq {runner.n_ctx_seq}, medians of {args.repeats}")
    print(
        "prompt  n  method  fork ms/child  fork+step ms/child  MiB/child"
        "  host/device (fork)  host/device (fork+step)"
    )
    for length in (500, 2000):
        for n in (2, 4):
            runner.reset()
            prompt = [(i * 7919) % 40000 + 100 for i in range(length)]
            runner.prefill(0, prompt)
            rows = {name: measure(runner, f, n, args.repeats) for name, f in methods.items()}
            host, device = rows["host"], rows["device"]
            for name, (fork_ms, total_ms, moved) in rows.items():
                ratios = (
                    f"  {host[0] / device[0]:17.1f}x  {host[1] / device[1]:22.1f}x"
                    if name == "device"
                    else ""
                )
                print(
                    f"{length:6d} {n:2d}  {name:6s} {fork_ms:14.2f} {total_ms:19.2f}"
                    f" {moved / 2**20:10.1f}{ratios}"
                )
    runner.close()
    model.close()


if __name__ == "__main__":
    main()
