"""What the dashboard and the alerts ask Prometheus for, and what a scrape offers: metric names in PromQL
expressions, metric families in the text exposition format, and the names other exporters are known to export."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import ray
import yaml

from tests.deploy.manifests import find

# Words of PromQL that are not metrics (functions are recognised by the parenthesis that follows them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan"}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count", "_created")
# Grafana's interval variables, as Prometheus would see them after Grafana replaced them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# The blackbox exporter's metric, behind the Probe deploy/monitoring/monitors.yaml defines.
BLACKBOX = {"probe_success"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not its functions, labels, keywords or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and other strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if not rest.startswith("(") and match.group(0).lower() not in KEYWORDS:
            names.add(match.group(0))
    return names


def family(name: str) -> str:
    """The metric family a series name belongs to (a histogram's `_bucket`, `_sum`, `_count` are its own)."""
    for suffix in HISTOGRAM_SERIES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def exposed_families(exposition: str) -> set[str]:
    """The families a /metrics page declares (its `# TYPE` lines: present even before a labelled metric has a
    sample, e.g. a counter by outcome before the first tick)."""
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}


def is_exported(name: str, families: set[str]) -> bool:
    """Whether a series name is one of these families (counters are declared with or without `_total`)."""
    return any(candidate in families for candidate in {name, family(name), name.removesuffix("_total")})


def dashboard() -> dict[str, Any]:
    return json.loads(find("ConfigMap", "vigil-dashboard")["data"]["vigil.json"])


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, those inside rows included (rows themselves left out)."""
    found = []
    for panel in dashboard()["panels"]:
        found += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """`(panel title, PromQL)` for every target, Grafana's interval variables replaced."""
    queries = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in find("PrometheusRule", "vigil")["spec"]["groups"] for rule in group["rules"]]


@cache
def ray_metric_names() -> frozenset[str]:
    """The metric names Ray's own Grafana dashboards query: the ones the installed Ray exports."""
    panels = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    names: set[str] = set()
    for path in panels.glob("*_panels.py"):
        names |= set(re.findall(r"\bray_[a-z0-9_]+", path.read_text()))
    return frozenset(names)


def yaml_rules_file(rules: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"groups": [{"name": "vigil", "rules": rules}]}, sort_keys=False)
