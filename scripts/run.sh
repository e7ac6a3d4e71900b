#!/usr/bin/env bash
# `make run`: the backend and the UI together. Ctrl-C (or SIGTERM) stops both and waits for them,
# so no process is left behind; if either exits on its own, the other is stopped too.
set -uo pipefail
cd "$(dirname "$0")/.."
pids=()
stop() {
  trap - INT TERM EXIT
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
}
trap stop INT TERM EXIT
.venv/bin/python -m backend &
pids+=($!)
.venv/bin/python -m chatui &
pids+=($!)
echo "make run: UI on http://localhost:${CHATUI_PORT:-7860}, API on http://localhost:${LLM_PORT:-8000}"
wait -n
