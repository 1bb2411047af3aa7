"""The Grafana dashboard and its provisioning: the structure Grafana needs, and PromQL that promtool parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from prometheus_client.metrics import MetricWrapperBase
from splitwire.cloud import metrics as cloud_metrics
from splitwire.edge import metrics as edge_metrics

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "splitwire.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "splitwire.yml"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"  # where compose mounts deploy/grafana/dashboards

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"row", "timeseries", "stat"}
UNITS = {"s", "bytes", "reqps", "short", "percentunit"}
GRID_COLUMNS = 24
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
# What Grafana would put in place of a variable, close enough for promtool to parse the result.
SUBSTITUTIONS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "model": ".*", "codec": ".*"}
# Labels every scraped series carries besides its own, and the bucket label of a histogram.
TARGET_LABELS = {"job", "instance", "le"}

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$")
_METRIC = re.compile(r"\b(splitwire_\w+)")
_SELECTOR = re.compile(r"\b(splitwire_\w+)\{([^}]*)\}")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones a collapsed row holds included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query["query"] if isinstance(query, dict) else query


def substitute(expr: str) -> str:
    """The expression as Prometheus would receive it: known variables replaced, unknown ones left to be caught."""
    return _VARIABLE.sub(lambda m: SUBSTITUTIONS.get(m.group(1) or m.group(2), m.group(0)), expr)


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(label, PromQL) for every expression of the dashboard, variables substituted.

    Labels are ``dashboard_panel_<id>_<refId>`` for panel targets and ``dashboard_variable_<name>`` for the series
    selector inside a query variable's ``label_values(selector, label)``.
    """
    dashboard = load_dashboard() if dashboard is None else dashboard
    queries = [
        (f"dashboard_panel_{panel['id']}_{target['refId']}", substitute(target["expr"]))
        for panel in query_panels(dashboard)
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable_query(variable).strip())
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            queries.append((f"dashboard_variable_{variable['name']}", substitute(match["selector"])))
    return queries


def exported_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for every metric the cloud and the edge export."""
    series: dict[str, set[str]] = {}
    for module in (cloud_metrics, edge_metrics):
        for collector in vars(module).values():
            if not isinstance(collector, MetricWrapperBase):
                continue
            (family,) = collector.describe()
            labels = set(collector._labelnames)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
            for suffix in suffixes[family.type]:
                series[family.name + suffix] = labels
    return series


def test_dashboard_is_a_provisionable_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "splitwire" and dashboard["title"] == "splitwire"
    assert dashboard["id"] is None
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["templating"]["list"], list)
    assert dashboard["time"] == {"from": "now-15m", "to": "now"}
    assert dashboard["refresh"] == "10s"
    assert "splitwire" in dashboard["tags"]


def test_panels_have_unique_ids_known_types_and_units() -> None:
    panels = list(all_panels(load_dashboard()))
    ids = [panel["id"] for panel in panels]
    assert all(type(i) is int for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, (panel["id"], panel["type"])
        assert panel.get("title"), panel["id"]
        if panel["type"] != "row":
            assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, (panel["id"], panel["title"])


def test_panels_sit_inside_24_columns_without_overlapping() -> None:
    boxes = []
    for panel in all_panels(load_dashboard()):
        grid = panel["gridPos"]
        x, y, w, h = (grid[key] for key in ("x", "y", "w", "h"))
        assert all(type(v) is int for v in (x, y, w, h)), (panel["id"], grid)
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, (panel["id"], grid)
        boxes.append((panel["id"], x, y, w, h))
    for index, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[index + 1 :]:
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"panels {a} and {b} overlap"


def test_every_query_panel_targets_the_datasource_variable() -> None:
    for panel in query_panels(load_dashboard()):
        assert panel["datasource"] == DATASOURCE_REF, panel["id"]
        assert panel["targets"], f"panel {panel['id']} has no targets"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), (panel["id"], ref_ids)
        for target in panel["targets"]:
            assert target["refId"] and target["expr"].strip(), (panel["id"], target)
            assert target.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, (panel["id"], target["refId"])


def test_regex_overrides_match_a_series_of_their_panel() -> None:
    """The dashed "expected" line: an override whose regex matches no legend styles nothing."""
    overrides = 0
    for panel in query_panels(load_dashboard()):
        legends = [re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", t.get("legendFormat", "")) for t in panel["targets"]]
        for override in panel["fieldConfig"].get("overrides", []):
            if override["matcher"]["id"] == "byRegexp":
                overrides += 1
                pattern = re.compile(override["matcher"]["options"])
                assert any(pattern.fullmatch(legend) for legend in legends), (panel["id"], pattern, legends)
    assert overrides, "expected the codec's expected bits per token as a dashed series"


def test_template_variables_are_defined_before_use() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "codec"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE_REF, name
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*", name

    defined = set(BUILTIN_VARIABLES)
    for variable in dashboard["templating"]["list"]:
        used = {a or b for a, b in _VARIABLE.findall(json.dumps(variable.get("datasource", {})))}
        used |= {a or b for a, b in _VARIABLE.findall(variable_query(variable))}
        assert used <= defined, f"variable {variable['name']} uses {sorted(used - defined)} before it is defined"
        defined.add(variable["name"])
    for panel in query_panels(dashboard):
        for text in [json.dumps(panel["datasource"])] + [json.dumps(t) for t in panel["targets"]]:
            used = {a or b for a, b in _VARIABLE.findall(text)}
            assert used <= defined, f"panel {panel['id']} uses undefined {sorted(used - defined)}"


def test_queries_use_metrics_and_labels_the_services_export() -> None:
    """A renamed metric or a label it never had leaves a panel silently empty: compare against the collectors."""
    exported = exported_metrics()
    for label, expr in dashboard_queries():
        metrics = set(_METRIC.findall(expr))
        unknown = metrics - exported.keys()
        assert not unknown, f"{label}: not exported by the cloud or the edge: {sorted(unknown)}"
        for metric, matchers in _SELECTOR.findall(expr):
            labels = set(_MATCHER.findall(matchers))
            assert labels <= exported[metric] | TARGET_LABELS, f"{label}: {metric} has no {labels - exported[metric]}"
        if metrics:
            known = set().union(*(exported[metric] for metric in metrics)) | TARGET_LABELS
            for grouping in _GROUPING.findall(expr):
                labels = {name.strip() for name in grouping.split(",") if name.strip()}
                assert labels <= known, f"{label}: groups by {sorted(labels - known)}, which {sorted(metrics)} lack"


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    queries = dashboard_queries()
    assert len(queries) > 20
    for label, expr in queries:
        assert "$" not in expr, f"{label}: unsubstituted variable in {expr!r}"
    rules = [{"record": f"splitwire:{label}", "expr": expr} for label, expr in queries]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "splitwire-dashboard", "rules": rules}]}, sort_keys=False))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout


def test_datasource_provisioning_points_at_prometheus() -> None:
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["name"] == "Prometheus" and source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def test_dashboard_provisioning_loads_the_mounted_dashboards() -> None:
    config = yaml.safe_load(PROVIDERS.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT
    assert DASHBOARD.parent.name == "dashboards" and DASHBOARD.suffix == ".json"
