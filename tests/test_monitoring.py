"""monitoring/: the alerting rules pass ``promtool check rules`` and their unit tests (``promtool test rules``),
the example Prometheus config passes ``promtool check config``, the Grafana dashboard parses and every panel
queries something, and every metric and label the rules, their tests and the dashboard use is one a real
``dist-infer serve`` exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
ALERTS, ALERT_TESTS = MONITORING / "alerts.yml", MONITORING / "alerts_test.yml"
DASHBOARD, PROMETHEUS_CONFIG = MONITORING / "grafana-dashboard.json", MONITORING / "prometheus.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")

KEY = "sk-monitoring-test"
METRIC = re.compile(r"\bdist_infer_[A-Za-z0-9_]*[A-Za-z0-9]")
# Labels Prometheus itself attaches to every scraped series, and the histogram bucket bound.
SCRAPE_LABELS = {"job", "instance"}


def _promtool(*args: str, cwd: Path = MONITORING) -> str:
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def _grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's variables replaced by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def _dashboard_queries() -> list[tuple[str, str]]:
    """(expression, legend format) of every panel target."""
    return [(t["expr"], t.get("legendFormat", "")) for p in _panels(_dashboard()) for t in p["targets"]]


def _variable_queries() -> list[str]:
    out = []
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def _test_series() -> list[str]:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    return [s["series"] for t in tests for s in t.get("input_series", [])]


# ---- promtool ---------------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_check_rules():
    output = _promtool("check", "rules", ALERTS.name)
    assert f"SUCCESS: {len(_rules())} rules found" in output, output


@needs_promtool
def test_promtool_test_rules():
    output = _promtool("test", "rules", ALERT_TESTS.name)
    assert "SUCCESS" in output, output


@needs_promtool
def test_example_prometheus_config_checks(tmp_path):
    """promtool check config wants the bearer-token file to exist: point it at a temporary one."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    token = tmp_path / "api-key"
    token.write_text(KEY)
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    output = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "SUCCESS" in output and f"{len(_rules())} rules found" in output, output
    assert any(j["job_name"] == "dist-infer" and "authorization" in j for j in config["scrape_configs"])


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, its Grafana variables filled in, loaded as a recording rule that promtool parses."""
    queries = [_grafana_to_promql(expr) for expr, _ in _dashboard_queries()]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                         for i, q in enumerate(queries)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    output = _promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert f"SUCCESS: {len(queries)} rules found" in output, output


# ---- structure --------------------------------------------------------------------------------------------

def test_every_alert_is_labelled_annotated_and_tested_both_ways():
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) and len(names) >= 8, names
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        firing = [c for c in mine if c.get("exp_alerts")]
        assert firing, f"no case where {name} fires"
        assert any(not c.get("exp_alerts") for c in mine), f"no case where {name} stays silent"
        for case in firing:
            for alert in case["exp_alerts"]:
                assert set(alert["exp_annotations"]) >= {"summary", "description"}, name
                assert "severity" in alert["exp_labels"], name
    assert not {c["alertname"] for c in cases} - set(names), "a test case names an alert that does not exist"


def test_alerts_cover_the_issue():
    exprs = {r["alert"]: r["expr"] for r in _rules()}
    joined = "\n".join(exprs.values())
    for needle in ("dist_infer_replica_up", "up{", "dist_infer_ready_checks_total", "dist_infer_num_requests_waiting",
                   "dist_infer_kv_cache_usage_ratio > 0.9", "histogram_quantile(0.99",
                   "dist_infer_time_to_first_token_seconds_bucket", 'status=~"5.."',
                   "resets(dist_infer_worker_uptime_seconds"):
        assert needle in joined, needle


def test_dashboard_parses_and_every_panel_queries_something():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model"]["type"] == "query"
    panels = _panels(dashboard)
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"] and panel["gridPos"]["w"] > 0 and panel["gridPos"]["h"] > 0, panel
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for metric in ("dist_infer_requests_total", "dist_infer_time_to_first_token_seconds_bucket",
                   "dist_infer_inter_token_latency_seconds_bucket", "dist_infer_e2e_request_latency_seconds_bucket",
                   "dist_infer_generation_tokens_total", "dist_infer_num_requests_waiting",
                   "dist_infer_num_requests_running", "dist_infer_kv_cache_usage_ratio",
                   "dist_infer_prefix_cache_hit_rate", "dist_infer_replica_up", "dist_infer_stage_idle_ratio",
                   "dist_infer_worker_uptime_seconds"):
        assert any(metric in expr for expr, _ in _dashboard_queries()), f"no panel shows {metric}"


# ---- against a real server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_llama_with_tokenizer) -> dict[str, set[str]]:
    """Sample name -> label names, scraped from a real ``dist-infer serve`` after a completion and a /ready."""
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22),
                           env={"DIST_INFER_API_KEY": KEY})
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        model = httpx.get(server.base_url + "/v1/models", headers=auth, timeout=60).json()["data"][0]["id"]
        reply = httpx.post(server.base_url + "/v1/completions", headers=auth, timeout=120,
                           json={"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert httpx.get(server.base_url + "/ready", headers=auth, timeout=120).status_code == 200
        response = httpx.get(server.base_url + "/metrics", headers=auth, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _referenced_labels(expr: str) -> set[str]:
    """Label names in selectors' matchers and in by/without clauses of a PromQL expression."""
    labels = set()
    for matchers in re.findall(r"\{([^{}]*)\}", expr):
        labels.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in clause.split(",") if x.strip())
    return labels


def test_every_metric_used_is_exported(exported):
    sources = {f"alert {r['alert']}": r["expr"] for r in _rules()}
    sources.update({f"test series {s}": s for s in _test_series()})
    sources.update({f"dashboard query {e}": e for e, _ in _dashboard_queries()})
    sources.update({f"dashboard variable {q}": q for q in _variable_queries()})
    missing = {f"{name} (in {where})" for where, text in sources.items() for name in METRIC.findall(text)
               if name not in exported}
    assert not missing, "not exported by the server:\n" + "\n".join(sorted(missing)) + \
        "\nexported: " + ", ".join(sorted(n for n in exported if n.startswith("dist_infer_")))


def test_every_label_used_is_exported(exported):
    """A label an expression filters or groups on, a legend shows, or a synthetic test series carries, is on one
    of the metrics it reads."""
    texts = [(r["expr"], "") for r in _rules()] + _dashboard_queries() + [(q, "") for q in _variable_queries()]
    texts += [(series, "") for series in _test_series()]
    problems = []
    for expr, legend in texts:
        metrics = [m for m in METRIC.findall(expr) if m in exported]
        if not metrics:
            continue
        available = set().union(*(exported[m] for m in metrics)) | SCRAPE_LABELS
        wanted = _referenced_labels(expr) | set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
        if wanted - available:
            problems.append(f"{sorted(wanted - available)} in {expr!r} (the metrics have {sorted(available)})")
    assert not problems, "\n".join(problems)
