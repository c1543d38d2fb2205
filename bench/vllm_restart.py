"""Time to healthy of ``axiscap serve --backend vllm``, a first start and a restart with the same
model and axis: the restart should reuse vLLM's torch.compile cache (keyed by the axis file, not by
anything that changes per start). Prints JSON with both times and the compile cache folders made.

    .venv-vllm/bin/python bench/vllm_restart.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import machine, server  # noqa: E402

VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.5"]


def compile_caches() -> set[str]:
    # vLLM 0.32 keeps one folder per cache key under torch_compile_cache/<kind>/.
    root = Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm")) / "torch_compile_cache"
    return {p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir()}


def main() -> None:
    import vllm

    from axiscap.server.app import free_port

    before = compile_caches()
    starts = []
    for _ in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "axiscap.cli", "serve", "--backend", "vllm", "--port", str(port),
               "--log-level", "warning", *VLLM_ARGS]
        start = time.monotonic()
        with server(cmd, f"http://127.0.0.1:{port}/health", timeout=900):
            starts.append(round(time.monotonic() - start, 1))
    print(json.dumps({"machine": {**machine(), "vllm": vllm.__version__}, "vllm_args": VLLM_ARGS,
                      "seconds_to_healthy": {"first_start": starts[0], "restart": starts[1]},
                      "compile_caches_made": sorted(compile_caches() - before)}, indent=2))


if __name__ == "__main__":
    main()
