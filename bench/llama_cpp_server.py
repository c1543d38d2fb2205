"""llama-cpp-python's OpenAI server, with llama.cpp's extra weight buffers (repacking, AMX) off.

With them, llama-cpp-python 0.3.36 built here (AMX_INT8 CPU) segfaults in the first decode of the
shipped Q4_1 file; without them it runs, on llama.cpp's ordinary AVX-512 kernels. The server has
no flag for it, so this sets the model default before handing over to ``llama_cpp.server``. Runs in
the llama-cpp-python environment; the arguments are the server's own.
"""

import runpy

import llama_cpp.llama_cpp as bindings  # what llama_cpp.Llama reads its defaults from

_defaults = bindings.llama_model_default_params


def _without_extra_buffers():
    params = _defaults()
    params.use_extra_bufts = False
    return params


bindings.llama_model_default_params = _without_extra_buffers
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
