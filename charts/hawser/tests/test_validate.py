"""Every rendered manifest validates against a recent Kubernetes OpenAPI schema (strict)."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from chartlib import CHART, NAMESPACE, PROVIDER_VALUES, RELEASE, load_chart

KUBERNETES_VERSION = "1.34.0"
# Custom resources kubernetes-validate has no schema for; checked structurally in test_render.
CRD_KINDS = {"ServiceMonitor"}

VARIANTS = {
    **PROVIDER_VALUES,
    "everything-on": {
        "metrics": {"serviceMonitor": {"enabled": True}},
        "operator": {"replicas": 3, "podAntiAffinity": "hard", "extraArgs": ["--node-debounce=5s"],
                     "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
                     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra",
                                      "effect": "NoSchedule"}],
                     "networkPolicy": {"enabled": True, "metricsFrom": [
                         {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "minimal": {"dataplane": {"enabled": False}, "metrics": {"service": {"enabled": False}},
                "operator": {"replicas": 1, "networkPolicy": {"enabled": False}}},
}


class UniqueKeyLoader(yaml.SafeLoader):
    """Refuses duplicate mapping keys, which the API server would silently collapse."""


def _construct_mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def test_schema_version_is_available():
    assert any(v.startswith("1.34") for v in kubernetes_validate.utils.all_versions())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_validate(variant):
    with load_chart() as chart:
        files = chart.render(VARIANTS[variant], name=RELEASE, namespace=NAMESPACE, is_install=True)
    checked = 0
    for path, text in sorted(files.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.load_all(text, Loader=UniqueKeyLoader):
            if not doc:
                continue
            if doc["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
            checked += 1
    assert checked >= (5 if variant == "minimal" else 12), f"only {checked} objects validated"


def test_validation_is_not_vacuous():
    bad = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"},
           "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "hostNetwork": True}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
