#!/usr/bin/env bash
# hawser end-to-end suite on kind: create the cluster, build and load the images, install
# charts/hawser with the mock provider, run the suite with the kind backend, tear down.
#
#   e2e/kind/run.sh            # everything, then delete the cluster
#   KEEP_CLUSTER=1 e2e/kind/run.sh
#
# Needs docker, kind, kubectl, helm, cargo, and root for `ip route` (sudo is used when not
# root): the suite routes the mock pool's load-balancer addresses from this machine to the
# healthy kind nodes, which is how those addresses become reachable here (see e2e/src/kind.rs).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cluster=hawser-e2e
namespace=hawser-system
pool=203.0.113.0/24
state_port=18080
sudo=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
pf_pid=""

teardown() {
  [ -n "$pf_pid" ] && kill "$pf_pid" 2>/dev/null || true
  # The suite's load-balancer routes (one /32 per address of the mock pool).
  ip route show | awk '$1 ~ /^203\.0\.113\./ || ($1 == "blackhole" && $2 ~ /^203\.0\.113\./) {print}' |
    while read -r route; do $sudo ip route del $route 2>/dev/null || true; done
  if [ -z "${KEEP_CLUSTER:-}" ]; then kind delete cluster --name "$cluster" || true; fi
}
trap teardown EXIT

kind create cluster --config "$root/e2e/kind/cluster.yaml" --name "$cluster" --wait 120s

for bin in hawser-operator hawser-dataplane; do
  docker build -f "$root/e2e/kind/Dockerfile" --build-arg BIN="$bin" --target "$bin" -t "$bin:e2e" "$root"
  kind load docker-image "$bin:e2e" --name "$cluster"
done

helm upgrade --install hawser "$root/charts/hawser" --namespace "$namespace" --create-namespace --wait --timeout 3m \
  --set provider=mock --set clusterName=e2e --set "mock.addressPool={$pool}" \
  --set operator.replicas=1 --set operator.leaderElection.enabled=false \
  --set operator.image.repository=hawser-operator --set operator.image.tag=e2e --set operator.image.pullPolicy=Never \
  --set dataplane.image.repository=hawser-dataplane --set dataplane.image.tag=e2e --set dataplane.image.pullPolicy=Never \
  --set dataplane.minSyncIntervalMs=200

# The mock cloud's state, for the suite's load-balancer agent and assertions.
operator=$(kubectl -n "$namespace" get deploy -o name | grep operator)
kubectl -n "$namespace" port-forward "$operator" "$state_port:8080" >/dev/null &
pf_pid=$!
for _ in $(seq 30); do curl -fsS "127.0.0.1:$state_port/mock/state" >/dev/null && break; sleep 1; done

cd "$root"
cargo build --tests -p hawser-e2e
$sudo env "PATH=$PATH" "KUBECONFIG=${KUBECONFIG:-$HOME/.kube/config}" HAWSER_E2E_BACKEND=kind \
  HAWSER_E2E_MOCK_STATE="127.0.0.1:$state_port" \
  cargo test -p hawser-e2e --test scenarios -- --test-threads=2
