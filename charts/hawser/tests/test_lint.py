"""`helm lint --strict` (Helm v4 Go SDK) is clean for the defaults and each provider."""

from __future__ import annotations

import helm_python as helm
import pytest

from chartlib import CHART, PROVIDER_VALUES

KUBE_VERSION = "v1.34.0"


@pytest.mark.parametrize("provider", sorted(PROVIDER_VALUES))
def test_lint_strict_is_clean(provider):
    report = helm.lint(CHART, PROVIDER_VALUES[provider], strict=True, namespace="hawser-system",
                       kube_version=KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], report


def test_lint_reports_bad_values():
    """The linter is not vacuous: it sees a schema violation."""
    report = helm.lint(CHART, {"provider": "azure"}, strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 2], report
