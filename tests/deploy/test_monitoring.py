"""Alerts and dashboard mean what they say: promtool accepts the alert rules and their unit tests pass (a tick
p99 above a second, more than 1 % skipped, readiness failing, memory writes lost, more than 20 % of delegations
failing or timing out), every dashboard query is valid PromQL, and every metric the dashboard or an alert names is
one Vigil, Ray or the readiness probe exports, and one a scraped process serves."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from actors.common.metrics import VigilMetrics
from tests.deploy.promql import (
    BLACKBOX,
    alert_rules,
    dashboard,
    dashboard_queries,
    exposed_families,
    is_exported,
    metric_names,
    ray_metric_names,
    yaml_rules_file,
)

pytestmark = pytest.mark.unit

UNIT_TESTS = Path(__file__).resolve().parent / "alerts_test.yaml"
# Families only the brain replica's registry counts: no port serves it (only the ingest replicas have one), so a
# panel or alert on them would stay empty. The ingest counts each delegation's outcome itself.
BRAIN_REPLICA_ONLY = {"vigil_delegations_in_flight", "vigil_delegation_deliveries_failed_total"}


def _promtool(*args: str, cwd: Path) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make system-packages` installs Debian's prometheus package"
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_alert_rules_pass_promtool_and_their_unit_tests(tmp_path: Path) -> None:
    # The PrometheusRule's groups are a rules file as Prometheus itself reads them.
    (tmp_path / "vigil-rules.yaml").write_text(yaml_rules_file(alert_rules()))
    assert "6 rules found" in _promtool("check", "rules", "vigil-rules.yaml", cwd=tmp_path)
    (tmp_path / "alerts_test.yaml").write_text(UNIT_TESTS.read_text())
    _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    tested = {case["alertname"] for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
              for case in group["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    # promtool parses recording rules' expressions exactly as Prometheus does.
    rules = [{"record": f"vigil:dashboard:{index}", "expr": expr} for index, (_, expr) in enumerate(queries)]
    (tmp_path / "dashboard-rules.yaml").write_text(yaml_rules_file(rules))
    _promtool("check", "rules", "dashboard-rules.yaml", cwd=tmp_path)


def test_the_metric_name_reader_finds_metrics_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, stage) (rate(vigil_tick_stage_seconds_bucket{stage="total"}[5m])))'
            ' / on (pod) group_left sum(up{job="x"} offset 5m) > bool 1e3')
    assert metric_names(expr) == {"vigil_tick_stage_seconds_bucket", "up"}


def _unknown(names: set[str], families: set[str]) -> set[str]:
    return {n for n in names if not (is_exported(n, families) or n in ray_metric_names() or n in BLACKBOX)}


def test_the_dashboard_and_alerts_name_only_exported_metrics() -> None:
    # The families of a fresh process's /metrics; the running graph's own page is checked in test_serve_graph.
    families = exposed_families(VigilMetrics().render().decode())
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr}"
        assert _unknown(names, families) == set(), f"panel {title!r} names metrics no one exports"
    for rule in alert_rules():
        assert _unknown(metric_names(rule["expr"]), families) == set(), rule["alert"]


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    named = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    for needed in ("vigil_ticks_total", "vigil_tick_stage_seconds_bucket", "vigil_active_sessions",
                   "vigil_prefix_reuse_ratio_sum", "vigil_memory_writes_total", "probe_success",
                   "ray_serve_deployment_replica_healthy", "vigil_delegations_total",
                   "vigil_delegation_seconds_bucket"):
        assert needed in named, needed
    assert any('outcome="delegate"' in expr for _, expr in dashboard_queries())
    # Delegations by outcome, and their latency, in panels of their own.
    titles = {title for title, expr in dashboard_queries()
              if "sum by (outcome) (rate(vigil_delegations_total[" in expr}
    assert titles and all("vigil_delegation_seconds" not in expr for title, expr in dashboard_queries()
                          if title in titles)
    assert any("histogram_quantile" in expr and "vigil_delegation_seconds_bucket" in expr
               for _, expr in dashboard_queries())
    # Beside Ray's own Serve dashboards, which it links to.
    assert {link["url"] for link in dashboard()["links"]} >= {"/d/rayServeDashboard"}


def test_nothing_reads_a_metric_only_the_brain_replica_counts() -> None:
    # The ingest's registry declares every family, these too, but only the brain replica ever counts them.
    assert BRAIN_REPLICA_ONLY <= exposed_families(VigilMetrics().render().decode())
    named = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    named |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert {name for name in named if is_exported(name, BRAIN_REPLICA_ONLY)} == set()


def test_the_delegation_alert_and_its_dashboard_panel_count_the_same_outcomes() -> None:
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "VigilDelegationsFailing"]
    failing = 'vigil_delegations_total{outcome=~"failed|timed_out"}'
    assert failing in rule["expr"] and "> 0.2" in rule["expr"] and "[15m]" in rule["expr"]
    assert any(failing in expr and title.startswith("Delegations failed") for title, expr in dashboard_queries())
    # Outcomes the ingest counts (actors/common/metrics.py) include both; the others are done and cancelled.
    (help_line,) = [line for line in VigilMetrics().render().decode().splitlines()
                    if line.startswith("# HELP vigil_delegations_total ")]
    assert all(outcome in help_line for outcome in ("done", "failed", "timed_out", "cancelled"))
