"""A against B: the built-in engine's serving figures at two git revisions, taking turns.

For a refactor that must not change speed: each revision's wheel is built into a folder of its own
and put first on PYTHONPATH, and ``bench/serve.py --peers axiscap`` (this tree's) measures it; the two
revisions alternate for ``--rounds`` rounds, so both see the same machine load, and each round's
B/A ratio of output tokens/s is computed within that round.

    python bench/ab_revisions.py 77d7d5f HEAD --concurrency 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def install(revision: str, folder: Path) -> Path:
    """The revision's wheel, installed (without dependencies) into ``folder/site``."""
    tree = folder / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(folder / "wheels"), str(tree)], check=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    wheel = next((folder / "wheels").glob("axiscap-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(folder / "site"),
                    str(wheel)], check=True)
    return folder / "site"


def measure(site: Path, args, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--peers", "axiscap", "--rounds", "1",
                    "--max-tokens", str(args.max_tokens), "--out", str(out),
                    "--concurrency", *map(str, args.concurrency)], env=env, check=True, capture_output=True)
    report = json.loads(out.read_text())
    return {f"{run['contender'].removeprefix('axiscap_')}_c{run['concurrency']}": run["output_tokens_per_s"]
            for run in report["runs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from serve import machine

    with tempfile.TemporaryDirectory() as tmp:
        sites = {name: install(name, Path(tmp) / str(i)) for i, name in enumerate((args.a, args.b))}
        rounds = []
        for _ in range(args.rounds):
            figures = {name: measure(site, args, Path(tmp) / "out.json") for name, site in sites.items()}
            a, b = figures[args.a], figures[args.b]
            rounds.append({"tokens_per_s": figures, "b_over_a": {k: round(b[k] / a[k], 3) for k in a}})
    print(json.dumps({"machine": machine(), "a": args.a, "b": args.b, "max_tokens": args.max_tokens,
                      "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
