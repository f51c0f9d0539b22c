"""What a user installing the chart gets, for the defaults and for each provider."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from chartlib import CHART, NAMESPACE, PROVIDER_VALUES, find, notes, render


def container(doc):
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def args_of(doc) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for a in container(doc)["args"]:
        key, _, value = a.partition("=")
        out[key] = value if value else None
    return out


def env_of(doc) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(doc).get("env", [])}


@pytest.mark.parametrize("provider", sorted(PROVIDER_VALUES))
def test_each_provider_renders_the_full_set_of_objects(provider):
    docs = render(PROVIDER_VALUES[provider])
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("ClusterRole", "hawser-dataplane"),
            ("ClusterRole", "hawser-operator"),
            ("ClusterRoleBinding", "hawser-dataplane"),
            ("ClusterRoleBinding", "hawser-operator"),
            ("DaemonSet", "hawser-dataplane"),
            ("Deployment", "hawser-operator"),
            ("NetworkPolicy", "hawser-operator"),
            ("PodDisruptionBudget", "hawser-operator"),
            ("Role", "hawser-operator-leader-election"),
            ("RoleBinding", "hawser-operator-leader-election"),
            ("Service", "hawser-dataplane-metrics"),
            ("Service", "hawser-operator-metrics"),
            ("ServiceAccount", "hawser-dataplane"),
            ("ServiceAccount", "hawser-operator"),
        ]
    )
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
    args = args_of(find(docs, "Deployment"))
    assert args["--provider"] == provider


def test_operator_is_highly_available_by_default():
    docs = render()
    dep = find(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    args = args_of(dep)
    assert "--leader-elect" in args
    assert args["--leader-election-id"] == "hawser-operator"
    role = find(docs, "Role")
    assert any(r.get("resourceNames") == ["hawser-operator"] for r in role["rules"]), "Lease named in the Role"
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    anti = spec["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti, "soft by default"
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_operator_probes_resources_and_identity():
    dep = find(render(), "Deployment")
    c = container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    args = args_of(dep)
    assert args["--metrics-bind-address"] == ":8080"
    assert args["--health-probe-bind-address"] == ":8081"
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    env = env_of(dep)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert args["--log-format"] == "json"


def test_operator_security_context_is_restricted():
    dep = find(render(), "Deployment")
    pod = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(dep)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_single_replica_has_no_pdb_and_leader_election_can_be_turned_off():
    docs = render({"operator": {"replicas": 1, "leaderElection": {"enabled": False, "leaseName": "x"}}})
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert "--leader-elect" not in args_of(find(docs, "Deployment"))


def test_more_than_one_replica_forces_leader_election():
    docs = render({"operator": {"replicas": 3, "leaderElection": {"enabled": False, "leaseName": "lb-lease"}}})
    args = args_of(find(docs, "Deployment"))
    assert "--leader-elect" in args and args["--leader-election-id"] == "lb-lease"
    assert find(docs, "PodDisruptionBudget")
    assert find(docs, "Role")["rules"][1]["resourceNames"] == ["lb-lease"]


def test_hard_anti_affinity_and_custom_affinity():
    dep = find(render({"operator": {"podAntiAffinity": "hard"}}), "Deployment")
    assert dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    custom = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}]}}}
    dep = find(render({"operator": {"affinity": custom}}), "Deployment")
    assert dep["spec"]["template"]["spec"]["affinity"] == custom


def test_dry_run_is_off_by_default_and_a_value_turns_it_on():
    assert "--dry-run" not in args_of(find(render(), "Deployment"))
    args = args_of(find(render({"operator": {"dryRun": True}}), "Deployment"))
    assert "--dry-run" in args
    assert args["--gc"] == "on", "the operator itself turns the collector to report under --dry-run"


def test_dataplane_daemonset():
    docs = render()
    ds = find(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    c = container(ds)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}, "NET_ADMIN only, no NET_RAW"
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["tolerations"] == [{"operator": "Exists"}], "runs on every node, tainted or not"
    assert env_of(ds)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env_of(ds)["MIMALLOC_PURGE_DELAY"] == "0"  # the RSS the sync bench reports
    assert env_of(ds)["MIMALLOC_ALLOW_THP"] == "0"  # the full-sync figures the sync bench reports
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 10266, "metrics": 10267}
    args = args_of(ds)
    assert args["--health-port"] == "10266"
    assert args["--metrics-bind-address"] == "0.0.0.0:10267"
    assert args_of(find(docs, "Deployment"))["--node-health-port"] == "10266", "operator probes the same port"
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": "10%", "maxSurge": 0}
    assert spec["terminationGracePeriodSeconds"] >= 10
    assert spec["priorityClassName"] == "system-node-critical"
    assert "--cleanup" not in args, "an upgrade must not flush the rules"


def test_health_port_moves_both_sides():
    docs = render({"dataplane": {"healthPort": 10300}})
    assert args_of(find(docs, "DaemonSet"))["--health-port"] == "10300"
    assert args_of(find(docs, "Deployment"))["--node-health-port"] == "10300"


def test_dataplane_can_be_disabled():
    docs = render({"dataplane": {"enabled": False}, "operator": {"healthCheckMode": "kube-proxy"}})
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not [n for n in names if "dataplane" in n[1]], names
    assert args_of(find(docs, "Deployment"))["--health-check-mode"] == "kube-proxy"


def test_load_balancer_class_reaches_both_binaries():
    docs = render({"loadBalancerClass": "example.com/internal"})
    assert args_of(find(docs, "Deployment"))["--load-balancer-class"] == "example.com/internal"
    assert args_of(find(docs, "DaemonSet"))["--load-balancer-class"] == "example.com/internal"


def test_images_default_to_app_version_and_can_be_pinned():
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    docs = render()
    assert container(find(docs, "Deployment"))["image"] == f"ghcr.io/hawser-dev/hawser-operator:{app_version}"
    assert container(find(docs, "DaemonSet"))["image"] == f"ghcr.io/hawser-dev/hawser-dataplane:{app_version}"
    digest = "sha256:" + "a" * 64
    docs = render({"operator": {"image": {"repository": "reg.example/op", "tag": "v9", "pullPolicy": "Always"}},
                   "dataplane": {"image": {"repository": "reg.example/dp", "tag": "", "digest": digest,
                                           "pullPolicy": "IfNotPresent"}}})
    assert container(find(docs, "Deployment"))["image"] == "reg.example/op:v9"
    assert container(find(docs, "Deployment"))["imagePullPolicy"] == "Always"
    assert container(find(docs, "DaemonSet"))["image"] == f"reg.example/dp@{digest}"


def test_aws_values():
    docs = render(PROVIDER_VALUES["aws"])
    sa = find(docs, "ServiceAccount", "-operator")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/hawser"}
    dep = find(docs, "Deployment")
    assert args_of(dep)["--cluster-name"] == "prod-eks", "the EKS cluster name names the cluster by default"
    assert env_of(dep)["AWS_REGION"] == "us-east-1"
    assert "--mock-address-pool" not in args_of(dep)
    assert find(docs, "ServiceAccount", "-dataplane")["metadata"]["annotations"] == {}, "the dataplane needs no cloud"


def test_gcp_values():
    docs = render(PROVIDER_VALUES["gcp"])
    sa = find(docs, "ServiceAccount", "-operator")
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "hawser@my-project-123.iam.gserviceaccount.com"
    }
    dep = find(docs, "Deployment")
    assert args_of(dep)["--cluster-name"] == "prod-gke"
    assert env_of(dep)["GOOGLE_CLOUD_PROJECT"] == "my-project-123"


def test_service_account_annotations_are_merged_with_provider_ones():
    values = dict(PROVIDER_VALUES["aws"])
    values["operator"] = {"serviceAccount": {"create": True, "annotations": {"team": "net"}}}
    sa = find(render(values), "ServiceAccount", "-operator")
    assert sa["metadata"]["annotations"] == {
        "team": "net",
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/hawser",
    }


def test_existing_service_accounts_are_bound():
    docs = render({"operator": {"serviceAccount": {"create": False, "name": "ops-sa"}},
                   "dataplane": {"serviceAccount": {"create": False, "name": "dp-sa"}}})
    assert not [d for d in docs if d["kind"] == "ServiceAccount"]
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"
    assert find(docs, "ClusterRoleBinding", "-operator")["subjects"][0]["name"] == "ops-sa"
    assert find(docs, "RoleBinding")["subjects"][0]["name"] == "ops-sa"
    assert find(docs, "ClusterRoleBinding", "-dataplane")["subjects"][0]["name"] == "dp-sa"


def test_mock_values():
    docs = render({"mock": {"addressPool": ["198.51.100.0/24", "2001:db8::/112"]}})
    args = args_of(find(docs, "Deployment"))
    assert args["--mock-address-pool"] == "198.51.100.0/24,2001:db8::/112"
    assert args["--cluster-name"] == "hawser", "mock defaults to the release name"


def test_cluster_name_is_required_for_gcp():
    values = {"provider": "gcp", "gcp": {"project": "my-project-123"}}
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError, match="clusterName"):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError, match="clusterName"):
            chart.render(values, name="hawser", namespace=NAMESPACE)


def test_metrics_services_and_service_monitors():
    docs = render()
    for component, port in (("operator", 8080), ("dataplane", 10267)):
        svc = find(docs, "Service", f"-{component}-metrics")
        assert svc["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == component
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"], "off by default: needs the Prometheus CRDs"
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}}})
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    for m in monitors:
        assert m["metadata"]["labels"]["release"] == "prom"
        assert m["spec"]["endpoints"][0]["port"] == "metrics"
        assert m["spec"]["endpoints"][0]["interval"] == "15s"
        svc = find(docs, "Service", f"-{m['metadata']['labels']['app.kubernetes.io/component']}-metrics")
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_names_fit_and_overrides_work():
    docs = render({"fullnameOverride": "lb"})
    assert find(docs, "Deployment")["metadata"]["name"] == "lb-operator"
    assert find(docs, "Service", "-dataplane-metrics")["metadata"]["name"] == "lb-dataplane-metrics"


def test_notes_tell_how_to_use_the_class():
    text = notes()
    assert "loadBalancerClass: hawser.dev/lb" in text
    assert "kubectl" in text
    assert "WARNING" in notes({"provider": "aws", "aws": {"clusterName": "c"}}), "no IRSA role is flagged"
    assert "WARNING" not in notes(PROVIDER_VALUES["aws"])


def test_readme_documents_every_value_and_the_install_commands():
    readme = (CHART / "README.md").read_text()
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema

    def leaves(s, prefix=""):
        for key, sub in s.get("properties", {}).items():
            path = f"{prefix}{key}"
            if sub.get("type") == "object" and sub.get("additionalProperties") is False:
                yield from leaves(sub, path + ".")
            else:
                yield path

    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    missing = sorted(set(leaves(schema)) - rows)
    assert not missing, f"values missing from the README values table: {missing}"
    unknown = sorted(rows - set(leaves(schema)))
    assert not unknown, f"README documents values the chart does not have: {unknown}"
    assert "helm install hawser charts/hawser" in readme
    assert "--set provider=aws" in readme and "--set provider=gcp" in readme
