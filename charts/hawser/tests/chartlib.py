"""Rendering the hawser chart with the Helm v4 Go SDK (helm-python-sdk), shared by the tests and
by e2e/tests/chart_rbac.rs (through `python -m chartlib`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent.parent
RELEASE = "hawser"
NAMESPACE = "hawser-system"

# Values a user passes on the command line for each provider (what the README tells them).
PROVIDER_VALUES: dict[str, dict[str, Any]] = {
    "mock": {"provider": "mock"},
    "aws": {
        "provider": "aws",
        "aws": {
            "region": "us-east-1",
            "vpcId": "vpc-0123456789abcdef0",
            "clusterName": "prod-eks",
            "roleArn": "arn:aws:iam::123456789012:role/hawser",
        },
    },
    "gcp": {
        "provider": "gcp",
        "clusterName": "prod-gke",
        "gcp": {
            "project": "my-project-123",
            "region": "europe-west1",
            "network": "default",
            "serviceAccount": "hawser@my-project-123.iam.gserviceaccount.com",
        },
    },
}


def load_chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt excluded), schema-validated like an install."""
    with load_chart() as chart:
        chart.validate_schema(values or {})
        files = chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(files.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append(doc)
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    with load_chart() as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def main() -> int:
    parser = argparse.ArgumentParser(description="Render the hawser chart as a JSON list of objects.")
    parser.add_argument("--provider", default="mock", choices=sorted(PROVIDER_VALUES))
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--values-json", default="{}", help="extra values, merged over the provider's")
    args = parser.parse_args()
    values = json.loads(json.dumps(PROVIDER_VALUES[args.provider]))
    values.update(json.loads(args.values_json))
    json.dump(render(values, namespace=args.namespace), sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
