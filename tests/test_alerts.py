"""deploy/prometheus/alerts.yml against a live scrape: promtool checks the rules and the
exposition, and ``promtool test rules`` evaluates every alert on series recorded from the
scrape of a broker whose credentials are expiring, expired, missing and failing to refresh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SecretRegistry

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)"
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
LABELS = {"instance": "web-1:8790", "job": "credbroker"}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
async def scrape(
    tmp_path: Path, harness_factory: Any, secrets: SecretRegistry
) -> tuple[str, float]:
    """The /metrics text of a broker with one credential in each alerting state, and when."""
    from tests.test_http import cred, serving  # the HTTP API harness

    now = time.time()
    soon, gone, failing = tmp_path / "soon", tmp_path / "gone", tmp_path / "failing"
    for path, exp in ((soon, now + 1200), (gone, now - 3600), (failing, now - 60)):
        path.write_text(secrets.jwt(exp=int(exp), iat=int(now - 7200)))
        path.chmod(0o600)
    jwt = {"format": "jwt", "expiry": "jwt"}
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    credentials = [
        cred("soon", soon, **jwt),
        cred("gone", gone, **jwt),
        cred("absent", tmp_path / "absent"),
        cred("failing", failing, **jwt, refresh={"command": fail, "on": "expired"}),
    ]
    (tmp_path / "not-a-dir").write_text("")
    async with serving(
        harness_factory, credentials, secrets,
        broker={"state_dir": str(tmp_path / "not-a-dir" / "state")},  # -> from memory
    ) as (h, api, client):
        while (await h.next("failing", timeout=20)).type != "credentials.refresh_failed":
            pass
        scraped_at = time.time()
        response = await client.session.get(f"{api.url}/metrics")
        assert response.status == 200
        return await response.text(), scraped_at


@pytest.mark.anyio
async def test_alerts_fire_on_a_recorded_scrape(
    tmp_path: Path, scrape: tuple[str, float]
) -> None:
    text, scraped_at = scrape
    lint = promtool("check", "metrics", stdin=text)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    series = _recorded_series(text, scraped_at)
    names = {s["series"].split("{")[0] for s in series}
    assert {"credbroker_build_info", "process_open_fds",
            "credbroker_credential_expiry_timestamp_seconds",
            "credbroker_sink_delivered_events_total"} <= names

    def alert(name: str, **labels: str) -> dict[str, Any]:
        return _expected(name, {**LABELS, **labels})

    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                # After 12 minutes every `for:` has passed and "soon" has 8 minutes left.
                {"eval_time": "12m", "alertname": "CredbrokerCredentialExpiringSoon",
                 "exp_alerts": [alert("CredbrokerCredentialExpiringSoon", credential="soon")]},
                {"eval_time": "12m", "alertname": "CredbrokerCredentialExpired",
                 "exp_alerts": [
                     alert("CredbrokerCredentialExpired", credential=c, status="expired")
                     for c in ("failing", "gone")]},
                {"eval_time": "12m", "alertname": "CredbrokerCredentialUnusable",
                 "exp_alerts": [alert("CredbrokerCredentialUnusable", credential="absent",
                                      status="missing")]},
                {"eval_time": "12m", "alertname": "CredbrokerRefreshFailing",
                 "exp_alerts": [alert("CredbrokerRefreshFailing", credential="failing",
                                      code="refresh-failed")]},
                {"eval_time": "12m", "alertname": "CredbrokerStateStoreUnhealthy",
                 "exp_alerts": [alert("CredbrokerStateStoreUnhealthy")]},
                {"eval_time": "12m", "alertname": "CredbrokerMqttDisconnected",
                 "exp_alerts": []},  # no [mqtt] here: off is not disconnected
                {"eval_time": "12m", "alertname": "CredbrokerConsumersLagging",
                 "exp_alerts": []},  # nobody reported
                # Not before their `for:`.
                {"eval_time": "3m", "alertname": "CredbrokerCredentialExpiringSoon",
                 "exp_alerts": []},
                {"eval_time": "8m", "alertname": "CredbrokerRefreshFailing", "exp_alerts": []},
                # Once "soon" has expired it is no longer "expiring soon".
                {"eval_time": "25m", "alertname": "CredbrokerCredentialExpiringSoon",
                 "exp_alerts": []},
            ],
        },
    ]
    result = _run_rule_tests(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_for_what_a_single_scrape_here_cannot_show(tmp_path: Path) -> None:
    # MQTT down and consumers behind, as the broker exports them (names from broker/metrics.py).
    mqtt = {"credbroker_mqtt_enabled": "1+0x30", "credbroker_mqtt_connected": "1 1 0+0x28"}
    series = [{"series": f"{name}{_labels(LABELS)}", "values": values}
              for name, values in mqtt.items()]
    series.append({"series": "credbroker_credential_consumers_behind"
                             + _labels({**LABELS, "credential": "nebius"}),
                   "values": "0 0 2+0x28"})
    tests = [{
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "CredbrokerMqttDisconnected", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "CredbrokerMqttDisconnected",
             "exp_alerts": [_expected("CredbrokerMqttDisconnected", LABELS)]},
            {"eval_time": "5m", "alertname": "CredbrokerConsumersLagging", "exp_alerts": []},
            {"eval_time": "8m", "alertname": "CredbrokerConsumersLagging",
             "exp_alerts": [_expected("CredbrokerConsumersLagging",
                                      {**LABELS, "credential": "nebius"}, value="2")]},
        ],
    }]
    result = _run_rule_tests(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def _expected(alert: str, labels: dict[str, str], value: str = "1") -> dict[str, Any]:
    """What promtool must report for ``alert`` on a series with ``labels``: the rule's own
    labels added, its annotation templates filled in (the few forms alerts.yml uses)."""
    rule = next(r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                if r["alert"] == alert)

    def render(template: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
        return text.replace("{{ $value }}", value)

    return {"exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": {k: render(v) for k, v in rule["annotations"].items()}}


def _run_rule_tests(
    tmp_path: Path, tests: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}))
    return promtool("test", "rules", str(path))


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _recorded_series(text: str, scraped_at: float) -> list[dict[str, str]]:
    """Every sample of the scrape as a series that holds its value for 40 minutes.

    promtool's clock starts at 0: an absolute timestamp is shifted by the scrape time, so
    "expires in 20 minutes" stays exactly that.
    """
    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            value = sample.value
            if sample.name == "credbroker_credential_expiry_timestamp_seconds":
                value -= scraped_at
            series.append({
                "series": sample.name + _labels({**sample.labels, **LABELS}),
                "values": f"{value!r}+0x40",
            })
    return series
