"""`python -m bench.llamacpp_server ARGS`: llama-cpp-python's server, loading weights as
our engine does.

Its `Llama` class has no option for llama.cpp's extra buffer types, and a build with ggml's AMX
kernels segfaults in them (see `backend.engines.llamacpp_runner.model_params`). `Llama.__init__`
(llama_cpp/llama.py, 0.3.36) starts from `llama_cpp.llama_cpp.llama_model_default_params()`,
looked up at call time, so this replaces that one function with our rule, then runs the server
unchanged.
"""

from __future__ import annotations

import runpy

import llama_cpp.llama_cpp as llama

from backend.engines.llamacpp_runner import model_params

if __name__ == "__main__":
    llama.llama_model_default_params = model_params
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
