"""Security policy of the rendered workloads.

checkov is not installed by the test requirements (its pinned dependencies would downgrade
boto3/botocore and packaging in the shared venv that the AWS provider's moto tests use), so the
checkov Kubernetes checks that apply to this chart are written out here, by their checkov IDs.
When checkov is on PATH it is run as well and must report nothing but the documented skips.
Every check the chart does not follow is skipped with a `checkov.io/skipN: ID=reason` annotation
on the workload, and must be listed in SKIPPED below with the same workloads.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from chartlib import PROVIDER_VALUES, find, render

SKIPPED = {
    "Deployment": {"CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_38"},
    "DaemonSet": {"CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_38", "CKV_K8S_19", "CKV_K8S_25",
                  "CKV_K8S_23", "CKV_K8S_40"},
}
# Graph checks cannot be skipped by annotation. CKV2_K8S_6 (pod without a NetworkPolicy) fails for
# the dataplane only: it runs on the host network, where NetworkPolicies do not apply. The
# operator has one (operator.networkPolicy).
GRAPH_SKIPS = {("CKV2_K8S_6", "dataplane")}


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]


def skips(doc) -> dict[str, str]:
    out = {}
    for key, value in doc["metadata"]["annotations"].items():
        if key.startswith("checkov.io/skip"):
            check, _, reason = value.partition("=")
            out[check] = reason
    return out


@pytest.fixture(scope="module", params=sorted(PROVIDER_VALUES))
def docs(request):
    return render(PROVIDER_VALUES[request.param])


def test_skips_are_the_documented_ones_and_each_has_a_reason(docs):
    for w in workloads(docs):
        s = skips(w)
        assert set(s) == SKIPPED[w["kind"]], w["kind"]
        for check, reason in s.items():
            assert len(reason.split()) >= 6, f"{check} skipped without a real reason: {reason!r}"


def test_pod_level_policies(docs):
    for w in workloads(docs):
        spec = w["spec"]["template"]["spec"]
        s = SKIPPED[w["kind"]]
        assert not spec.get("hostPID") and not spec.get("hostIPC"), "CKV_K8S_17/18"
        assert spec.get("hostNetwork", False) is False or "CKV_K8S_19" in s, "CKV_K8S_19"
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "CKV_K8S_31"
        assert spec["serviceAccountName"] != "default", "CKV_K8S_41"
        assert w["metadata"]["namespace"] != "default", "CKV_K8S_21"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["privileged"] is False, "CKV_K8S_16"
            assert sc["allowPrivilegeEscalation"] is False, "CKV_K8S_20"
            assert sc["readOnlyRootFilesystem"] is True, "CKV_K8S_22"
            assert "ALL" in sc["capabilities"]["drop"], "CKV_K8S_28/37"
            added = set(sc["capabilities"].get("add", []))
            assert not added or "CKV_K8S_25" in s, "CKV_K8S_25"
            assert not added - {"NET_ADMIN"}, f"only NET_ADMIN may be added, got {added}"
            assert "SYS_ADMIN" not in added and "NET_RAW" not in added, "CKV_K8S_39/28"
            root = sc.get("runAsUser", spec["securityContext"].get("runAsUser")) == 0
            assert not root or {"CKV_K8S_23", "CKV_K8S_40"} <= s, "CKV_K8S_23/40"
            assert sc.get("runAsNonRoot", True) or root, "runAsNonRoot false only for the root dataplane"
            if not root:
                assert sc["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000, "CKV_K8S_40"
            assert c["livenessProbe"] and c["readinessProbe"], "CKV_K8S_8/9"
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], "CKV_K8S_10/12"
            assert c["resources"]["limits"]["memory"], "CKV_K8S_13"
            assert not c["image"].endswith(":latest") and (":" in c["image"] or "@" in c["image"]), "CKV_K8S_14"
            for port in c["ports"]:
                assert "hostPort" not in port, "CKV_K8S_26"
            assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})], "CKV_K8S_35"


def test_only_the_dataplane_is_on_the_host_network(docs):
    assert find(docs, "DaemonSet")["spec"]["template"]["spec"]["hostNetwork"] is True
    assert "hostNetwork" not in find(docs, "Deployment")["spec"]["template"]["spec"]
    assert find(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_operator_pods_have_a_network_policy(docs):
    policy = find(docs, "NetworkPolicy")
    dep = find(docs, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {"metrics", "health"}


def test_rbac_has_no_wildcards_secrets_or_escalation(docs):
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard {field} (CKV_K8S_49)"
            assert not {"secrets", "pods/exec", "clusterroles", "roles", "rolebindings",
                        "clusterrolebindings", "serviceaccounts/token"} & set(rule["resources"]), "CKV_K8S_155+"
            assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(rule["verbs"])


@pytest.mark.skipif(shutil.which("checkov") is None, reason="checkov is not installed (see the module docstring)")
def test_checkov_reports_only_documented_skips(tmp_path, docs):
    (tmp_path / "chart.yaml").write_text(yaml.safe_dump_all(docs))
    out = subprocess.run(["checkov", "-d", str(tmp_path), "--framework", "kubernetes", "-o", "json"],
                         capture_output=True, text=True, check=False)
    report = json.loads(out.stdout)

    def component(resource: str) -> str:
        return "dataplane" if "dataplane" in resource else "operator"

    failed = {(f["check_id"], component(f["resource"])) for f in report["results"]["failed_checks"]}
    assert failed <= GRAPH_SKIPS, failed - GRAPH_SKIPS
    skipped = {(s["check_id"], s["resource"].split(".")[0]) for s in report["results"]["skipped_checks"]}
    assert skipped == {(c, k) for k, cs in SKIPPED.items() for c in cs}
    assert report["summary"]["passed"] > 100, "checkov ran its Kubernetes checks"
