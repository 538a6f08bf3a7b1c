"""infra/: alert rules, scrape config, Grafana dashboard and Kubernetes manifests stay coherent
with the metrics khala_stream.metrics defines.

Structure is checked here always. With promtool on PATH the rules, the alert unit tests, the
scrape config and every dashboard expression are also checked by Prometheus's own parser. In CI
(CI set; .ci/run installs promtool) or with KHALA_REQUIRE_PROMTOOL=1 a missing promtool fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from khala_stream import metrics

INFRA = Path(__file__).resolve().parents[2] / "infra"
ALERTS = INFRA / "prometheus" / "alerts.yml"
ALERT_TESTS = INFRA / "prometheus" / "alerts_test.yml"
SCRAPE = INFRA / "prometheus" / "prometheus.yml"
DASHBOARD = INFRA / "grafana" / "khala-stream.json"
K8S = INFRA / "k8s"
STAGES = ("publish", "process", "sink")
_METRIC = re.compile(r"\b(khala_[a-z0-9_]+)")
_DURATION = re.compile(r"^\d+[smhd]$")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _referenced(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def _dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in data["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


# ------------------------------------------------------------------ alert rules
def test_alert_rules_structure() -> None:
    data = _load(ALERTS)
    assert set(data) == {"groups"}
    names: list[str] = []
    for group in data["groups"]:
        assert set(group) == {"name", "rules"}
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert {"alert", "expr", "labels", "annotations"} <= set(rule)
            assert re.fullmatch(r"Khala[A-Za-z]+", rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])
            assert rule["annotations"]["runbook"].startswith("infra/OPERATIONS.md#")
            if "for" in rule:
                assert _DURATION.match(rule["for"])
            assert _referenced(rule["expr"]), rule["expr"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    # What the issue asks to alert on.
    exprs = " ".join(r["expr"] for g in data["groups"] for r in g["rules"])
    for needed in ('status="STOP"', 'status="STALL"', "max_lag_seconds", "dead_letters_total"):
        assert needed in exprs


def test_every_referenced_metric_exists() -> None:
    known = metrics.metric_names()
    alerts = _load(ALERTS)
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    tests = _load(ALERT_TESTS)
    series = [s["series"] for t in tests["tests"] for s in t["input_series"]]
    for text in [*exprs, *_dashboard_exprs(), *series]:
        assert _referenced(text) <= known, (text, _referenced(text) - known)


def test_runbook_anchors_exist() -> None:
    guide = (INFRA / "OPERATIONS.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in guide.splitlines()
        if line.startswith("#")
    }
    for group in _load(ALERTS)["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook"].split("#", 1)[1] in anchors


def test_scrape_config_loads_the_rules() -> None:
    config = _load(SCRAPE)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["khala-stream"]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == sorted(STAGES)
    k8s = _load(K8S / "prometheus-scrape.yml")
    (job,) = k8s["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]


# ------------------------------------------------------------------ Grafana
def test_dashboard_structure() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "khala-stream"
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in data["templating"]["list"]}
    assert {"datasource", "group", "stage"} <= variables
    for panel in data["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
    exprs = " ".join(_dashboard_exprs())
    # Lag, throughput, latency, dead letters and WorkOS all have a panel.
    for family in (
        "khala_consumergroup_lag_messages",
        "khala_consumergroup_max_lag_seconds",
        "khala_consumergroup_status",
        "khala_records_in_total",
        "khala_records_out_total",
        "khala_batch_duration_seconds_bucket",
        "khala_dead_letters_total",
        "khala_workos_requests_total",
        "khala_workos_cache_lookups_total",
    ):
        assert family in exprs


# ------------------------------------------------------------------ Kubernetes
def _manifests() -> list[dict[str, Any]]:
    kustomization = _load(K8S / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def test_one_deployment_per_stage() -> None:
    deployments = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "Deployment"}
    assert sorted(deployments) == sorted(f"khala-{s}" for s in STAGES)
    for stage in STAGES:
        spec = deployments[f"khala-{stage}"]["spec"]
        template = spec["template"]
        assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == stage
        (container,) = template["spec"]["containers"]
        command = " ".join([*container.get("command", []), *container.get("args", [])])
        assert stage in command
        assert "--metrics-port 9400" in command or '"--metrics-port", "9400"' in command
        assert "--metrics-host" in command  # loopback by default: a pod must listen outside
        assert [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"] == [9400]
        # Secrets only from the Secret, never from flags or the ConfigMap.
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["DATABASE_URL"]["valueFrom"]
        assert "WORKOS_API_KEY" not in command
    # Consumers: replicas bounded by the partition count (6 by default, KafkaSettings).
    for stage in ("process", "sink"):
        assert 1 <= deployments[f"khala-{stage}"]["spec"]["replicas"] <= 6
    assert deployments["khala-publish"]["spec"]["replicas"] in (0, 1)
    assert deployments["khala-publish"]["spec"]["strategy"]["type"] == "Recreate"


def test_configmap_holds_no_secret() -> None:
    (config,) = [d for d in _manifests() if d["kind"] == "ConfigMap"]
    assert not any(
        word in key.upper() for key in config["data"] for word in ("PASSWORD", "KEY", "SECRET")
    )
    assert "DATABASE_URL" not in config["data"]


# ------------------------------------------------------------------ promtool
def promtool_required(environ: Mapping[str, str]) -> bool:
    """CI (CI set, as .ci/run runs) or KHALA_REQUIRE_PROMTOOL=1: a missing promtool fails."""
    ci = environ.get("CI", "").lower() not in ("", "0", "false", "no")
    return ci or environ.get("KHALA_REQUIRE_PROMTOOL") == "1"


def _promtool() -> str | None:
    found = shutil.which("promtool")
    if found is None and promtool_required(os.environ):
        pytest.fail(
            "promtool not found, and CI or KHALA_REQUIRE_PROMTOOL=1 requires it "
            "(.ci/run installs it from Debian's prometheus package)"
        )
    return found


def test_promtool_required_in_ci() -> None:
    assert promtool_required({"CI": "true"})
    assert promtool_required({"CI": "1", "KHALA_REQUIRE_PROMTOOL": "0"})
    assert promtool_required({"KHALA_REQUIRE_PROMTOOL": "1"})
    assert not promtool_required({})
    assert not promtool_required({"CI": "false"})


def _check(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks(tmp_path: Path) -> None:
    promtool = _promtool()
    if promtool is None:
        pytest.skip("promtool not installed: the structure tests above are the check here")
    _check(promtool, "check", "rules", str(ALERTS))
    _check(promtool, "test", "rules", str(ALERT_TESTS))
    _check(promtool, "check", "config", str(SCRAPE))
    # Every dashboard query parses as PromQL, once Grafana's variables are filled in.
    grafana = {"$__rate_interval": "5m", "$group": ".*", "$stage": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for variable, example in grafana.items():
            expr = expr.replace(variable, example)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    check = tmp_path / "dashboard_rules.yml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _check(promtool, "check", "rules", str(check))
