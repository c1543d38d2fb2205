"""`axiscap serve`'s flags are generated from Settings: one definition of each flag, its env var,
default and help; settings the chosen backend does not read are refused at start."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from axiscap.cli import build_parser
from axiscap.server.config import Settings, cli_overrides


def serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def serve_help() -> str:
    """The help text on one line (argparse's wrapping splits hyphenated words)."""
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return " ".join(serve.format_help().split())


def test_every_setting_is_a_flag_with_its_description(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    text = serve_help()
    for name, field in Settings.model_fields.items():
        flag = "--api-key" if name == "api_keys" else "--" + name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(field.description.split()) in text, name
    assert "--max-batch-size MAX_BATCH_SIZE transformers backend only: requests decoded together (default 16)" in text
    assert "--capping-default, --no-capping-default cap requests that do not set 'capping' (default on)" in text


def test_a_flag_overrides_the_environment_and_an_unset_flag_leaves_it(monkeypatch):
    monkeypatch.setenv("AXISCAP_MAX_WAITING", "7")
    monkeypatch.setenv("AXISCAP_PORT", "9001")
    monkeypatch.setenv("AXISCAP_API_KEYS", "a,b")
    settings = Settings(**cli_overrides(serve_args("--port", "9002", "--no-capping-default", "--dtype", "float32")))
    assert (settings.port, settings.max_waiting, settings.capping_default, settings.dtype) == (9002, 7, False, "float32")
    assert settings.api_keys == ["a", "b"]
    settings = Settings(**cli_overrides(serve_args("--api-key", "k1", "--api-key", "k2", "--max-model-len", "64")))
    assert settings.api_keys == ["k1", "k2"] and settings.max_model_len == 64


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--backend", "vllm", "--max-batch-size", "4", "--device", "cpu"], {},
     "--device (AXISCAP_DEVICE), --max-batch-size (AXISCAP_MAX_BATCH_SIZE)"),
    (["--backend", "vllm"], {"AXISCAP_KV_CACHE_TOKENS": "4096"}, "--kv-cache-tokens (AXISCAP_KV_CACHE_TOKENS)"),
    ([], {"AXISCAP_TENSOR_PARALLEL_SIZE": "2"}, "--tensor-parallel-size (AXISCAP_TENSOR_PARALLEL_SIZE)"),
])
def test_a_setting_the_backend_ignores_is_refused_at_start(argv, env, named, monkeypatch):
    """Before anything loads: the command exits at once with one line that names the setting."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = subprocess.run([sys.executable, "-m", "axiscap.cli", "serve", "--port", "1", *argv],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("axiscap: error: the ")
    assert named in run.stderr and "does not read" in run.stderr
    assert "Traceback" not in run.stderr


def test_settings_each_backend_reads_are_accepted():
    Settings(backend="vllm", tensor_parallel_size=2, max_num_seqs=8, gpu_memory_utilization=0.5, max_model_len=64)
    Settings(backend="transformers", device="cpu", max_batch_size=4, kv_cache_tokens=1024, prefill_chunk_tokens=64)


def test_a_bad_value_names_its_flag():
    run = subprocess.run([sys.executable, "-m", "axiscap.cli", "serve", "--max-request-kv-share", "2"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "axiscap: error: --max-request-kv-share: Input should be less than or equal to 1" \
        in run.stderr


def test_the_deploy_files_set_only_settings_their_backend_reads(monkeypatch):
    import yaml

    deploy = __import__("pathlib").Path(__file__).parent.parent / "deploy"
    config = yaml.safe_load((deploy / "k8s" / "configmap.yaml").read_text())["data"]
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        pod = yaml.safe_load((deploy / "k8s" / name).read_text())["spec"]["template"]["spec"]
        env = {**config, **{e["name"]: e.get("value", "secret") for e in pod["containers"][0]["env"]}}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert Settings().capping_policy == "always", name


# --- the axis tools' and the eval's flags come from their config dataclasses -------------------------

def test_axis_tool_flags_default_to_their_config_dataclasses(tmp_path):
    from axiscap.axes.build import BuildConfig
    from axiscap.axes.calibrate import CalibrateConfig
    from axiscap.flags import from_flags

    out = tmp_path / "x.safetensors"
    args = build_parser().parse_args(["axes", "build", "--out", str(out)])
    assert from_flags(BuildConfig, args, model_name="m") == BuildConfig("m", out)
    assert args.model == Settings.model_fields["model"].default and args.judge_url is None

    args = build_parser().parse_args(["axes", "build", "--out", str(out), "--band", "20:25", "--questions", "3"])
    cfg = from_flags(BuildConfig, args, model_name="m")
    assert (cfg.band, cfg.questions, cfg.percentile) == ((20, 25), 3, 25.0)

    args = build_parser().parse_args(["axes", "calibrate", "--axis", "a.safetensors", "--out", "b.safetensors",
                                      "--widths", "2", "3", "--capability-budget", "0.8"])
    cfg = from_flags(CalibrateConfig, args, model_name="m")
    assert cfg == CalibrateConfig("m", Path("a.safetensors"), Path("b.safetensors"), widths=(2, 3),
                                  capability_budget=0.8)
    assert cfg.percentiles == CalibrateConfig.percentiles and cfg.starts is None


def test_a_dataclass_default_is_shown_once_in_the_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["axes", "calibrate", "--help"])
    text = capsys.readouterr().out
    assert "band widths to try (default 2 4 6 8)" in text
    assert "tokens per answer (default 64)" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "tokens per answer (default 96)" in text and "{chat,responses}" in text


def test_the_eval_help_never_prints_the_api_key_from_the_environment(monkeypatch, capsys):
    import importlib

    import axiscap.evals.cli as eval_cli

    monkeypatch.setenv("AXISCAP_EVAL_API_KEY", "sk-secret-value")
    importlib.reload(eval_cli)  # the default is read when the options are declared
    try:
        parser = argparse.ArgumentParser()
        eval_cli.add_parser(parser.add_subparsers())
        assert parser.parse_args(["eval"]).api_key == "sk-secret-value"
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "--help"])
        assert "sk-secret-value" not in capsys.readouterr().out
    finally:
        monkeypatch.delenv("AXISCAP_EVAL_API_KEY")
        importlib.reload(eval_cli)
