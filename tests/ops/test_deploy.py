"""docs/deploy: the Grafana dashboard and the Prometheus alert rules query only documented metrics;
the Dockerfile has what docs/install.md promises. (Neither Grafana nor Docker runs here: these are
static checks; promtool checks the rules where it is installed.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs" / "deploy"
METRIC = re.compile(r"\bmqtt_proxy_[a-z0-9_]+")
HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions() -> list[str]:
    exprs = [target["expr"] for panel in panels() for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if isinstance(variable.get("query"), dict):
            exprs.append(variable["query"]["query"])
    return exprs


def documented_metrics() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `(mqtt_proxy_[a-z0-9_]+)` \|", text, re.MULTILINE))


def queried_metrics() -> set[str]:
    names = set()
    for expr in expressions():
        for name in METRIC.findall(expr):
            base = HISTOGRAM_SERIES.sub("", name)
            names.add(base if base in documented_metrics() else name)
    return names


def test_dashboard_queries_only_documented_metrics():
    assert documented_metrics(), "the metrics table in docs/operations.md moved"
    unknown = queried_metrics() - documented_metrics()
    assert not unknown, f"the dashboard queries metrics docs/operations.md does not list: {sorted(unknown)}"


def test_dashboard_shows_every_documented_metric():
    assert documented_metrics() - queried_metrics() == set()


def test_latency_quantiles_come_from_the_histogram():
    quantiles = [e for e in expressions() if "histogram_quantile" in e]
    assert any(e.startswith("histogram_quantile(0.5,") for e in quantiles)
    assert any(e.startswith("histogram_quantile(0.99,") for e in quantiles)
    assert all("mqtt_proxy_validation_duration_seconds_bucket" in e and "by (le)" in e for e in quantiles)


@pytest.mark.parametrize("expr", expressions())
def test_expressions_are_balanced(expr: str):
    for opening, closing in ("()", "{}", "[]"):
        depth = 0
        for char in expr:
            depth += (char == opening) - (char == closing)
            assert depth >= 0, expr
        assert depth == 0, expr
    assert expr.count('"') % 2 == 0, expr


def test_panels_have_unique_ids_and_do_not_overlap():
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_uses_the_datasource_variable():
    assert dashboard()["uid"] == "mqtt-governance-appliance"
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def dockerfile() -> list[str]:
    """Instructions of the final stage, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    stages = text.split("\nFROM ")
    return [line.strip() for line in ("FROM " + stages[-1]).splitlines() if line.strip() and not line.startswith("#")]


def instruction(name: str) -> list[str]:
    return [line[len(name) + 1:] for line in dockerfile() if line.startswith(name + " ")]


def test_dockerfile_image():
    assert instruction("FROM") == ["python:3.11-slim-bookworm"]
    assert any("apt-get install" in run and "mosquitto" in run for run in instruction("RUN"))
    assert instruction("USER") == ["mqtt-appliance"]
    assert instruction("VOLUME") == ["/var/lib/mqtt-appliance"]
    assert instruction("EXPOSE") == ["1883 9100"]
    assert "/readyz" in instruction("HEALTHCHECK")[0]
    assert json.loads(instruction("CMD")[0]) == ["appliance", "run", "--config", "/etc/mqtt-appliance/appliance.yaml"]


def test_dockerfile_copies_only_what_exists():
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line and "<<" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line


def test_install_doc_names_the_multi_arch_build():
    assert "docker buildx build --platform linux/amd64,linux/arm64" in (ROOT / "docs" / "install.md").read_text()


def test_the_package_metadata_raises_no_setuptools_deprecation():
    """`pip install .` printed a deprecation warning for the `license = { text = ... }` table."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), Path(__file__).resolve().parents[2] / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught if "Deprecat" in w.category.__name__] == []


# --- Prometheus alert rules ---------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus-alerts.yml"
# What the rules may query besides the appliance's own documented metrics.
STANDARD_SERIES = {"up"}


def alert_rules() -> list[dict[str, Any]]:
    import yaml

    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_cover_what_an_operator_must_hear_about():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "uplink down": "mqtt_proxy_uplink_up",
        "oldest unforwarded message": "mqtt_proxy_outbox_oldest_age_seconds",
        "quarantine growth": 'mqtt_proxy_messages_total{status="invalid"}',
        "audit degraded": "mqtt_proxy_audit_healthy",
        "disk space": "mqtt_proxy_state_dir_free_bytes",
    }
    for what, series in wanted.items():
        assert any(series in expr for expr in exprs.values()), f"no alert on {what} ({series})"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_alert_rules_query_only_documented_metrics():
    documented = documented_metrics()
    for rule in alert_rules():
        for name in METRIC.findall(rule["expr"]):
            assert name in documented, f"{rule['alert']}: {name} is not in docs/operations.md"
        other = set(re.findall(r"\b([a-z_]+)\{", rule["expr"])) - {m for m in METRIC.findall(rule["expr"])}
        assert other <= STANDARD_SERIES, f"{rule['alert']}: queries {other}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_the_alert_rules():
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
