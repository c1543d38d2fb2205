"""What the machine can do at most, measured, so serving speed is judged against the hardware and not
against another eager path: the CPU and the math library torch runs on, memory read bandwidth, and
the decode-speed limit it implies (at batch 1 every weight is read once per token).

    python bench/hardware.py                     # prints JSON: the machine and the SmolLM2 limit
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() says only "x86_64" on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("model name", "Model")) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def math_libraries() -> dict:
    """Which kernels torch's CPU path uses: the vector ISA it dispatches to, MKL, oneDNN (mkldnn)."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "blas": next((line.split("=", 1)[1].strip(", ") for line in torch.__config__.show().split(",")
                          if "BLAS_INFO" in line), None)}


def read_bandwidth_gb_s(megabytes: int = 512, repeats: int = 7) -> float:
    """Best-of memory read rate with torch's threads: a sum over a buffer far larger than the caches.
    Filled first: pages never written all map to one zero page and read at cache speed."""
    import torch

    x = torch.ones(megabytes * 2 ** 20 // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_limit(model, bandwidth_gb_s: float) -> dict:
    """The batch-1 decode limit: bandwidth over the weights read per token (the KV cache read is left
    out, so the true limit is a little lower)."""
    weights = weight_bytes(model)
    return {"read_gb_s": bandwidth_gb_s, "weight_mb": round(weights / 1e6, 1),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tok_s_limit": round(bandwidth_gb_s * 1e9 / weights, 1)}


def machine() -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), **math_libraries()}


def main() -> None:
    from axiscap.server.config import DEFAULT_MODEL_NAME
    from axiscap.server.engines.hf.model_loading import load_model

    loaded = load_model(DEFAULT_MODEL_NAME, device="cpu")
    print(json.dumps({"machine": machine(), "decode_limit": decode_limit(loaded.model, read_bandwidth_gb_s())},
                     indent=2))


if __name__ == "__main__":
    main()
