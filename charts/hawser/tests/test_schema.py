"""values.schema.json describes every value, rejects unknown keys and bad types."""

from __future__ import annotations

import helm_python as helm
import pytest
import yaml

from chartlib import CHART, PROVIDER_VALUES


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


@pytest.mark.parametrize("provider", sorted(PROVIDER_VALUES))
def test_defaults_and_provider_values_are_valid(chart, provider):
    chart.validate_schema(PROVIDER_VALUES[provider])


def test_every_key_in_values_yaml_is_described(chart):
    """Walks values.yaml and the schema side by side: every key has a described property."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(v, s, path):
        assert s.get("description"), f"{path or '<root>'} has no description in the schema"
        if isinstance(v, dict) and s.get("additionalProperties") is False:
            for key, sub in v.items():
                assert key in s["properties"], f"{path}{key} is in values.yaml but not in the schema"
                walk(sub, s["properties"][key], f"{path}{key}.")

    schema = dict(chart.schema)
    schema.setdefault("description", schema["title"])
    walk(values, schema, "")


BAD = [
    ({"provdier": "aws"}, "provdier"),
    ({"provider": "azure"}, "provider"),
    ({"operator": {"replica": 3}}, "replica"),
    ({"operator": {"replicas": "two"}}, "replicas"),
    ({"operator": {"replicas": 0}}, "replicas"),
    ({"operator": {"image": {"repository": "x", "tag": "1", "pullPolicy": "Sometimes"}}}, "pullPolicy"),
    ({"operator": {"image": {"repository": "x", "tag": "1", "pullPolicy": "Always", "digest": "md5:1"}}}, "digest"),
    ({"operator": {"leaderElection": {"enabled": True, "leaseName": "Bad_Name"}}}, "leaseName"),
    ({"operator": {"leaderElection": {"enabled": True, "leaseName": "l", "leaseDuration": "15"}}}, "leaseDuration"),
    ({"operator": {"resyncPeriod": "1d"}}, "resyncPeriod"),
    ({"operator": {"healthCheckMode": "tcp"}}, "healthCheckMode"),
    ({"operator": {"podAntiAffinity": "sometimes"}}, "podAntiAffinity"),
    ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "memory"),
    ({"operator": {"resources": {"limits": {"gpu": "1"}}}}, "gpu"),
    ({"operator": {"extraArgs": ["leader-elect"]}}, "extraArgs"),
    ({"operator": {"serviceAccount": {"create": True, "annotation": {}}}}, "annotation"),
    ({"operator": {"nodeSelector": {"pool": 1}}}, "pool"),
    ({"dataplane": {"healthPort": 70000}}, "healthPort"),
    ({"dataplane": {"healthPort": "10266"}}, "healthPort"),
    ({"dataplane": {"masqueradeBit": 14}}, "masqueradeBit"),
    ({"dataplane": {"masqueradeBit": 32}}, "masqueradeBit"),
    ({"dataplane": {"enabled": "yes"}}, "enabled"),
    ({"dataplane": {"updateStrategy": {"maxUnavailable": 0}}}, "maxUnavailable"),
    ({"dataplane": {"privileged": True}}, "privileged"),
    ({"aws": {"region": "us-east-1", "roleArn": "my-role"}}, "roleArn"),
    ({"aws": {"vpcId": "my-vpc"}}, "vpcId"),
    ({"aws": {"zone": "a"}}, "zone"),
    ({"gcp": {"serviceAccount": "hawser"}}, "serviceAccount"),
    ({"mock": {"addressPool": []}}, "addressPool"),
    ({"mock": {"addressPool": "203.0.113.0/24"}}, "addressPool"),
    ({"loadBalancerClass": "no-slash"}, "loadBalancerClass"),
    ({"clusterName": "bad name"}, "clusterName"),
    ({"logFormat": "xml"}, "logFormat"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}}, "interval"),
    ({"imagePullSecrets": ["regcred"]}, "imagePullSecrets"),
    ({"provider": "aws"}, "clusterName"),
    ({"provider": "gcp", "clusterName": "c"}, "project"),
]


@pytest.mark.parametrize("values,key", BAD, ids=[k + "-" + str(i) for i, (_, k) in enumerate(BAD)])
def test_bad_values_are_rejected_naming_the_key(chart, values, key):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert key in str(err.value), str(err.value)
    # An install renders through the same check.
    with pytest.raises(helm.HelmError):
        chart.render(values, name="hawser", namespace="hawser-system")
