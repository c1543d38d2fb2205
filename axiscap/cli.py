"""The ``axiscap`` command: serve a model with capping, and make axis files."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from axiscap.axes import axis_for
from axiscap.axes.build import BuildConfig
from axiscap.axes.calibrate import CalibrateConfig
from axiscap.evals.cli import add_parser as add_eval_parser
from axiscap.flags import add_flags, from_flags, option
from axiscap.server.config import DEFAULT_MODEL_NAME, Settings, cli_overrides
from axiscap.server.config import add_arguments as add_settings_arguments
from axiscap.steering import AxisFileError


@dataclass
class ModelOptions:
    """Which model an axis tool loads, and where."""

    model: str = option(DEFAULT_MODEL_NAME, help="model id or path (the axis's model)")
    device: str = option("auto", help="cpu, cuda or auto (the transformers model's)")
    cache_dir: Path | None = option(None, help="model cache (default ~/.cache/axiscap)")


@dataclass
class JudgeOptions:
    """An LLM judge on any OpenAI-compatible endpoint, in place of the offline role scorer."""

    judge_url: str | None = option(None, help="score role expression with an LLM judge at this OpenAI-compatible "
                                              "base URL (e.g. http://host:8000/v1) instead of the offline scorer")
    judge_model: str = option("gpt-4o-mini", help="the judge's model name")


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from axiscap.server.app import create_app, uvicorn_config
    from axiscap.server.state import load_state

    settings = Settings(**cli_overrides(args))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    axis_path = axis_for(settings.model, settings.axis)
    state = load_state(settings, axis_path)
    logging.getLogger("axiscap").info("axis %s: capping layers %s, monitoring layer %d",
                                      axis_path, state.axis.cap_layers, state.axis.monitor_layer)
    app = create_app(state)
    uvicorn.Server(uvicorn_config(app, settings.host, settings.port, settings.log_level)).run()


def _import_paper(args: argparse.Namespace) -> None:
    from axiscap.axes.paper_import import import_paper_axis
    from axiscap.steering import save_axis

    axis = import_paper_axis(args.axis_pt, args.config, args.experiment, args.model, args.monitor_layer)
    save_axis(axis, args.out)
    print(f"wrote {args.out}: capped layers {axis.cap_layers}, monitor layer {axis.monitor_layer}")


def _build(args: argparse.Namespace) -> None:
    from axiscap.axes.build import build
    from axiscap.axes.role_scoring import EmbeddingScorer, JudgeScorer
    from axiscap.server.engines.hf.model_loading import load_model
    from axiscap.server.engines.hf.threads import in_compute_thread, reserve_threads_for_engine
    from axiscap.server.engines.offline import built_in

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reserve_threads_for_engine()  # the engine decodes at full speed; the stages' own passes: in_compute_thread
    loaded = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    cfg = from_flags(BuildConfig, args, model_name=loaded.name)
    offline = built_in(loaded)
    try:
        scorer = JudgeScorer(args.judge_url, args.judge_model) if args.judge_url else EmbeddingScorer()
        path = build(cfg, loaded.model, loaded.tokenizer, offline.generate, scorer.score, in_compute_thread)
    finally:
        offline.close()
    print(f"wrote {path} (stages in {cfg.work})")


def _calibrate(args: argparse.Namespace) -> None:
    from axiscap.axes.calibrate import calibrate, calibrate_gate
    from axiscap.axes.role_scoring import EmbeddingScorer
    from axiscap.server.engines.hf.model_loading import load_model
    from axiscap.server.engines.hf.threads import in_compute_thread, reserve_threads_for_engine
    from axiscap.server.engines.offline import VllmForAxes, built_in_for
    from axiscap.server.engines.vllm import engine_module

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reserve_threads_for_engine()  # as in _build
    cfg = from_flags(CalibrateConfig, args, model_name=args.model)
    if args.backend == "vllm":
        engine_module()  # a missing vLLM fails before the model loads
    loaded = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    generators = (VllmForAxes(args.model, args.cache_dir, args.gpu_memory_utilization, loaded, cfg.axis_in)
                  if args.backend == "vllm" else nullcontext(functools.partial(built_in_for, loaded)))
    with generators as generator_for:
        if args.gate_only:
            path = calibrate_gate(cfg, loaded.model, generator_for, in_compute_thread)
            print(f"wrote {path} (its gate threshold only)")
            return
        score = None if args.no_role_scoring else EmbeddingScorer().score
        path = calibrate(cfg, loaded.model, loaded.tokenizer, generator_for, score, in_compute_thread)
    print(f"wrote {path} (report in {cfg.report}, stages in {cfg.work})")


def _dose_response(args: argparse.Namespace) -> None:
    import json

    from axiscap.axes.dose_response import dose_response
    from axiscap.axes.role_scoring import EmbeddingScorer, JudgeScorer
    from axiscap.server.engines.hf.model_loading import load_model
    from axiscap.server.engines.hf.threads import in_compute_thread, reserve_threads_for_engine
    from axiscap.server.engines.offline import built_in
    from axiscap.steering import load_axis

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reserve_threads_for_engine()  # as in _build
    load_axis(args.axis)  # a bad file fails before the model loads
    loaded = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    axis = load_axis(args.axis, loaded.n_layers, loaded.model.config.get_text_config().hidden_size)
    scorer = JudgeScorer(args.judge_url, args.judge_model) if args.judge_url else EmbeddingScorer()
    offline = built_in(loaded, axis)
    try:
        report = dose_response(loaded.model, loaded.tokenizer, axis, loaded.name,
                               functools.partial(offline.generate, capping=False),
                               functools.partial(offline.generate, capping=True), scorer.score,
                               args.max_new_tokens, args.questions_per_role, quick=args.quick, compute=in_compute_thread)
    finally:
        offline.close()
    n = report["conditions"]["uncapped"]["n"]
    print(f"{_report_key(args.axis)}: {n} answers of {report['n_roles']} check roles on {report['n_questions']} "
          f"questions, read back at layer {report['read_layer']} (before the band {report['band'][0]}-{report['band'][-1]})")
    for name, f in report["conditions"].items():
        line = f"  {name:>18}: in character {f['in_character']}/{f['n']}"
        if "lift_sd" in f:
            ci = f["lift_sd_ci"] or (float("nan"),) * 2
            line += (f", {f['lost']} lost / {f['gained']} gained (McNemar p = {f['mcnemar_p']:.3g}), "
                     f"lift {f['lift_sd']:+.2f} sd [{ci[0]:+.2f}, {ci[1]:+.2f}]")
        print(line)
    slope = report["slope"]
    ci = slope["slope_ci"] or (float("nan"),) * 2
    print(f"  in-character share per sd toward the Assistant: {slope['slope']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
          "(roles resampled)")
    if args.out:
        report["axis"] = _report_key(args.axis)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def _report_key(path: Path) -> str:
    """How a report names an axis file: relative to the working directory, else by its file name, so a
    committed report carries no machine's paths."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else resolved.name


def _check(args: argparse.Namespace) -> None:
    import json

    from axiscap.axes.check import auc_line, auc_text, check_answers, check_report, separation
    from axiscap.axes.role_scoring import EmbeddingScorer
    from axiscap.server.engines.hf.model_loading import load_model
    from axiscap.server.engines.hf.threads import in_compute_thread, reserve_threads_for_engine
    from axiscap.server.engines.offline import built_in
    from axiscap.steering import load_axis

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reserve_threads_for_engine()  # as in _build
    for path in args.axis:  # a bad file fails before the model loads
        load_axis(path)
    loaded = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    hidden = loaded.model.config.get_text_config().hidden_size
    axes = [load_axis(path, loaded.n_layers, hidden) for path in args.axis]
    offline = built_in(loaded)
    try:
        score = None if args.no_role_scoring else EmbeddingScorer().score
        # Sampled as a build samples, so a built axis is checked on answers like its own.
        rows = check_answers(loaded.name, offline.generate, score, loaded.tokenizer, BuildConfig.temperature,
                             BuildConfig.top_p, args.max_new_tokens, args.quick)
    finally:
        offline.close()
    separations = {}
    for path, axis in zip(args.axis, axes):
        figures = in_compute_thread(lambda: separation(loaded.model, axis, rows))
        print(f"{path} (monitor layer {axis.monitor_layer}): {figures['n_default']} default answers vs "
              f"{auc_line(figures)}")
        separations[_report_key(path)] = figures
    report = check_report(rows, separations, loaded.tokenizer)
    if report["baselines"]["bag_of_words"] is not None:
        print("bag-of-words baseline, cross-validated by role: "
              + auc_text(report["baselines"]["bag_of_words"], "role answers"))
    for pair, d in report["paired"].items():
        interval = "" if d["cluster_ci"] is None else " [{:+.3f}, {:+.3f}]".format(*d["cluster_ci"])
        lo, hi = d["delong"]["ci"]
        print(f"{pair}: AUC difference {d['difference']:+.3f}{interval} (questions and roles resampled); "
              f"DeLong [{lo:+.3f}, {hi:+.3f}], p = {d['delong']['p']:.2g} (answers independent)")
    if args.out:
        args.out.write_text(json.dumps({"model": loaded.name, **report}, indent=1) + "\n")
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axiscap",
        description="OpenAI-compatible LLM server that caps activations along the Assistant Axis "
                    "(Lu et al. 2026) and exports per-token axis projections as Prometheus metrics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
                    "Every flag can also be set as an AXISCAP_<FLAG> environment variable.")
    add_settings_arguments(serve)
    serve.set_defaults(run=_serve)

    axes = commands.add_parser("axes", help="make axis files").add_subparsers(dest="axes_command", required=True)
    imp = axes.add_parser(
        "import-paper", help="convert the paper's published axis and capping config",
        description="Convert assistant_axis.pt + capping_config.pt (lu-christina/assistant-axis-vectors) "
                    "into an axiscap axis file. Their role-ward vectors and cap ceilings become "
                    "Assistant-ward axes and floors.")
    imp.add_argument("--axis-pt", required=True, type=Path, help="assistant_axis.pt")
    imp.add_argument("--config", required=True, type=Path, help="capping_config.pt")
    imp.add_argument("--experiment", required=True,
                     help="experiment id, e.g. layers_46:54-p0.25, or its index in the config (0 is the first)")
    imp.add_argument("--model", required=True, help="the model the axis belongs to (recorded in the file)")
    imp.add_argument("--monitor-layer", type=int,
                     help="layer to monitor (default: the paper's target layer for its models, else the "
                          "middle of the capped band)")
    imp.add_argument("--out", required=True, type=Path, help="output .safetensors")
    imp.set_defaults(run=_import_paper)

    build = axes.add_parser(
        "build", help="build and calibrate an axis for a model, stage by stage (resumable)",
        description="Generate answers under default-Assistant and role-play prompts (axes/data) on the "
                    "server's engine, average each answer's decoder-layer outputs, score role expression "
                    "0-3, take axis = default - mean of fully-in-role role vectors, choose the capped band "
                    "and calibrate tau. Stages whose output exists in OUT's .build folder are skipped.")
    add_flags(build, ModelOptions)
    add_flags(build, BuildConfig)
    add_flags(build, JudgeOptions)
    build.set_defaults(run=_build)

    cal = axes.add_parser(
        "calibrate", help="choose the capped band and tau of an axis file by a sweep (resumable)",
        description="Sweep the capped band (first layer, width) and the tau percentile of an axis file (built "
                    "or imported; its direction is kept). tau comes from the model's own answers to ordinary "
                    "Assistant prompts (axes/data/calibration_prompts.json, train split). Each point is scored "
                    "by the share of validation prompts whose greedy answer capping leaves identical, and by "
                    "how far capping lifts role-play answers at the monitor layer; the points on the Pareto front "
                    "of the two then generate for real on the role prompts (answers still in character, their low "
                    "tail). The point with the largest lift inside --capability-budget is written to OUT, then "
                    "checked by generating for real. "
                    "Writes OUT, a report (OUT's .calibration folder: table, Pareto plot) and stages in OUT's "
                    ".calibrate folder; finished stages and measured points are skipped on a rerun.")
    add_flags(cal, ModelOptions)
    add_flags(cal, CalibrateConfig)
    cal.add_argument("--no-role-scoring", action="store_true",
                     help="skip the in-character share (needs the offline role scorer)")
    cal.add_argument("--gate-only", action="store_true",
                     help="keep the band and tau; only measure the gated policy's threshold (--capping-policy "
                          "gated) from the train answers and write it into OUT (for files calibrated before it)")
    cal.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                     help="the engine that generates the answers, the front and the verification: the built-in "
                          "one, or vLLM (pip install 'axiscap[vllm]'; one start, each point's caps copied into its "
                          "workers). The sweep's teacher-forced passes run on the transformers model either way "
                          "(default transformers)")
    cal.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                     help="--backend vllm: share of GPU memory vLLM takes; the transformers model shares the GPU "
                          "(default 0.5)")
    cal.set_defaults(run=_calibrate)

    check = axes.add_parser(
        "check", help="how well axis files separate the default Assistant from roles they never saw",
        description="Generate answers (uncapped, sampled as a build samples) to the check questions under the "
                    "default-Assistant conditions and the check roles' prompts (axes/data/check_*.json, which no "
                    "build or calibration reads), then print for each axis file the ROC AUC of default against "
                    "role answers by their mean projection at its monitor layer: against all role answers and "
                    "against those the offline scorer finds fully in role, with 95%% intervals and counts. "
                    "Several files are checked on the same answers.")
    check.add_argument("--axis", required=True, type=Path, nargs="+", help="axis files of one model")
    add_flags(check, ModelOptions)
    check.add_argument("--out", type=Path, help="also write the figures as JSON here")
    check.add_argument("--max-new-tokens", type=int, default=BuildConfig.max_new_tokens,
                       help=f"tokens per answer (default {BuildConfig.max_new_tokens}, as a build)")
    check.add_argument("--no-role-scoring", action="store_true",
                       help="skip the fully-in-role AUC (needs the offline role scorer)")
    check.add_argument("--quick", action="store_true", help="one role and one question (tests, smoke runs)")
    check.set_defaults(run=_check)

    dose = axes.add_parser(
        "dose-response", help="does pushing along the axis change what the model says (held-out roles)",
        description="The paper's causal test on the check roles and questions (which no build or calibration "
                    "reads): greedy answers in role uncapped, capped by the axis file, and steered (alpha standard "
                    "deviations added along the axis at its capped layers, alpha in +-0.5, 1, 2). For each: how "
                    "many answers stay fully in character (paired with the uncapped answer to the same prompt: "
                    "McNemar, an interval that resamples roles), and the lift in standard deviations of the "
                    "answers read back by the plain model at the layer before the band, so that the lift is a "
                    "change in what was said. Also the slope of the in-character share against alpha.")
    dose.add_argument("--axis", required=True, type=Path, help="the axis file (its capped layers are steered)")
    add_flags(dose, ModelOptions)
    add_flags(dose, JudgeOptions)
    dose.add_argument("--out", type=Path, help="also write the figures and every answer as JSON here")
    dose.add_argument("--max-new-tokens", type=int, default=BuildConfig.max_new_tokens,
                      help=f"tokens per answer (default {BuildConfig.max_new_tokens}, as a check)")
    dose.add_argument("--questions-per-role", type=int, default=None,
                      help="check questions asked in each check role (default all of them)")
    dose.add_argument("--quick", action="store_true", help="two roles, one question each (tests, smoke runs)")
    dose.set_defaults(run=_dose_response)

    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValidationError as exc:  # settings: one line per problem, named by its flag
        for error in exc.errors():
            flag = "--" + str(error["loc"][0]).replace("_", "-") + ": " if error["loc"] else ""
            print(f"axiscap: error: {flag}{error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        raise SystemExit(2) from None
    except (AxisFileError, RuntimeError, ValueError, OSError) as exc:  # bad input, missing model or file
        print(f"axiscap: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
