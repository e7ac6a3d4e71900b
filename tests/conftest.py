"""The whole suite runs the same on any host: no `LLM_*`/`CHATUI_*` setting of the shell leaks in
(except `LLM_DTYPE`, to run the suite in each number format), and models are cached in the repo."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HONOURED = {"LLM_DTYPE"}

for _name in [n for n in os.environ if n.startswith(("LLM_", "CHATUI_")) and n not in _HONOURED]:
    del os.environ[_name]
os.environ["LLM_CACHE_DIR"] = str(REPO / ".cache" / "models")
