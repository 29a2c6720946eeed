"""The shipped Prometheus rules and dashboard: generated from the settings, valid for promtool, every rule tested.

promtool comes with Debian's `prometheus` package; without it these tests fail (never skip) and say how to
install it.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from monitoring import alert_rules, dashboard
from monitoring.alert_settings import AlertSettings

TESTS_DIR = alert_rules.ALERTS_DIR / "tests"
UNIT_TESTS = sorted(TESTS_DIR.glob("*.yml"))
REGENERATE = "regenerate it with `python -m monitoring.{}` and commit it"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not on PATH: install Debian's prometheus package "
                    "(`make` does it; by hand: apt-get install -y prometheus)")
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=120)


def alert_names(rules_file: Path) -> list[str]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_shipped_rules_are_generated_from_the_default_settings():
    assert alert_rules.RULES_FILE.read_text() == alert_rules.render(AlertSettings()), \
        f"{alert_rules.RULES_FILE} is stale: " + REGENERATE.format("alert_rules")


def test_shipped_dashboard_is_generated_from_the_default_settings():
    assert dashboard.DASHBOARD_FILE.read_text() == dashboard.render(AlertSettings()), \
        f"{dashboard.DASHBOARD_FILE} is stale: " + REGENERATE.format("dashboard")


def test_promtool_accepts_the_rules():
    checked = promtool("check", "rules", alert_rules.RULES_FILE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names(alert_rules.RULES_FILE))} rules found" in checked.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_every_alert_has_a_unit_test_that_sees_it_fire_and_stay_quiet():
    firing, quiet = set(), set()
    for path in UNIT_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(alert_names(alert_rules.RULES_FILE))
    assert names - firing == set(), "alerts no unit test sees firing"
    assert names - quiet == set(), "alerts no unit test sees quiet"


@pytest.mark.parametrize(("change", "alert"), [
    ({"availability_objective": 0.99}, "TreeopsErrorBudgetBurn"),
    ({"latency_objective": 0.98}, "TreeopsLatencyBudgetBurn"),
    ({"max_mean_queue_time_ms": 7.0}, "TreeopsQueueTimeHigh"),
    ({"burn_windows": AlertSettings().burn_windows[1:]}, "TreeopsErrorBudgetBurn"),  # without the 1h/5m pair
])
def test_unit_tests_fail_on_rules_from_other_figures(tmp_path, change, alert):
    (tmp_path / "tests").mkdir()
    for path in UNIT_TESTS:
        shutil.copy(path, tmp_path / "tests")
    alert_rules.write_rules(tmp_path / alert_rules.RULES_FILE.name, AlertSettings(**change))
    result = promtool("test", "rules", *sorted((tmp_path / "tests").glob("*.yml")))
    assert result.returncode != 0 and f"alertname: {alert}," in result.stderr, result.stdout + result.stderr


def test_faster_clock_divides_every_window_and_wait():
    fast = AlertSettings().on_faster_clock(60)
    assert [(w.long, w.short, w.factor) for w in fast.burn_windows] == [
        (timedelta(minutes=1), timedelta(seconds=5), 14.4), (timedelta(minutes=6), timedelta(seconds=30), 6)]
    assert (fast.burn_for, fast.queue_window, fast.queue_for) == (timedelta(seconds=2), timedelta(seconds=5),
                                                                  timedelta(seconds=10))
    assert fast.availability_objective == AlertSettings().availability_objective


def test_latency_target_must_be_a_histogram_bucket():
    with pytest.raises(ValidationError, match=r"latency_target_s 0.007 is not a bucket .*0.005, 0.01"):
        AlertSettings(latency_target_s=0.007)


@pytest.mark.parametrize(("value", "text"), [
    (timedelta(hours=6), "6h"), (timedelta(seconds=90), "90s"), (timedelta(milliseconds=2500), "2500ms")])
def test_durations_in_prometheus_units(value, text):
    assert alert_rules.duration(value) == text


def test_sub_millisecond_durations_are_refused():
    with pytest.raises(ValueError, match="not a whole number of milliseconds"):
        alert_rules.duration(timedelta(microseconds=1500))
