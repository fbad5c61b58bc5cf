#!/usr/bin/env bash
# extproxy on a real cluster: a kind cluster (kube-proxy left in place), the image built from
# this repository, deploy/ applied, a server outside the cluster (a container on the kind
# network that answers with the address it saw), and the seeds' selector-less Services pointing
# at it. From a pod, the server must see the node's address for ClusterIP, NodePort and a
# LoadBalancer whose source ranges first refuse, then admit the client.
#
#   tests/kind/run.sh            (or: cargo xtask kind)
#
# Needs docker (with a running daemon), kind and kubectl; without them it says so and exits 0.
# Everything it creates (cluster, server container) is removed at the end, pass or fail.
# EXTPROXY_KIND_KEEP=1 keeps them for a look around.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CLUSTER="${EXTPROXY_KIND_CLUSTER:-extproxy-e2e}"
SERVER="${CLUSTER}-server"
IMAGE="extproxy:kind"
LB_IP="203.0.113.10" # off-link for the nodes: the packet reaches the uplink's TC egress
NODE_PORT=30080

missing=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "SKIP: kind tests need docker, kind and kubectl (missing: ${missing[*]})"
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "SKIP: kind tests need a running Docker daemon (docker info failed)"
  exit 0
fi

KUBECTL=(kubectl --context "kind-${CLUSTER}")
k() { "${KUBECTL[@]}" "$@"; }

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }

diagnose() {
  echo "--- extproxy logs" >&2
  k logs -n extproxy-system -l app.kubernetes.io/name=extproxy --tail=80 --prefix >&2 || true
  echo "--- events" >&2
  k get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
}

fail() {
  echo "FAIL: $*" >&2
  diagnose
  exit 1
}

cleanup() {
  if [ "${EXTPROXY_KIND_KEEP:-0}" = 1 ]; then
    echo "kept: kind cluster ${CLUSTER}, container ${SERVER}"
    return
  fi
  docker rm -f "$SERVER" >/dev/null 2>&1 || true
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
}
trap cleanup EXIT

step "kind cluster ${CLUSTER}"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml" --wait 180s
WORKER="${CLUSTER}-worker"
CONTROL_PLANE="${CLUSTER}-control-plane"
node_ip() {
  k get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}
WORKER_IP="$(node_ip "$WORKER")"
CONTROL_PLANE_IP="$(node_ip "$CONTROL_PLANE")"
POD_CIDR="$(k get node "$WORKER" -o jsonpath='{.spec.podCIDR}')"
ok "nodes ${WORKER} ${WORKER_IP}, ${CONTROL_PLANE} ${CONTROL_PLANE_IP}; pod CIDR ${POD_CIDR}"
k -n kube-system get daemonset kube-proxy >/dev/null || fail "kube-proxy is not running"

step "image ${IMAGE}"
docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "deploy/ (kubectl apply -k, image ${IMAGE})"
k apply -k "$HERE/overlay"
k -n extproxy-system rollout status daemonset/extproxy --timeout=180s ||
  fail "the DaemonSet did not become ready"

step "a server outside the cluster, answering with the peer address"
docker rm -f "$SERVER" >/dev/null 2>&1 || true
# Ports 80 (seed 000) and 8080 (seed 001); reply.sh answers with the address the server saw.
docker create --name "$SERVER" --network kind --entrypoint sh alpine/socat -c \
  'socat TCP-LISTEN:80,fork,reuseaddr EXEC:/reply & exec socat TCP-LISTEN:8080,fork,reuseaddr EXEC:/reply' \
  >/dev/null
docker cp "$HERE/reply.sh" "$SERVER:/reply"
docker start "$SERVER" >/dev/null
SERVER_IP="$(docker inspect -f '{{(index .NetworkSettings.Networks "kind").IPAddress}}' "$SERVER")"
[ -n "$SERVER_IP" ] || fail "the server container has no address on the kind network"
ok "server ${SERVER_IP}:80 and :8080"

step "a client pod on ${WORKER}"
k run client --image=busybox:1.36 --restart=Never \
  --overrides="{\"apiVersion\":\"v1\",\"spec\":{\"nodeName\":\"${WORKER}\"}}" -- sleep 36000
k wait --for=condition=Ready pod/client --timeout=120s

# The address the server saw, fetched through the pod ("" when the connection fails).
seen() {
  k exec client -- wget -qO- -T 3 "http://$1/" 2>/dev/null | tr -d '\r' | tail -n 1 || true
}
expect_seen() {
  local target=$1 want=$2 what=$3 got=""
  for _ in $(seq 1 30); do
    got="$(seen "$target")"
    if [ "$got" = "$want" ]; then
      ok "${what}: the server saw ${got}"
      return
    fi
    sleep 1
  done
  fail "${what} (${target}): the server saw '${got:-no connection}', expected ${want}"
}
expect_refused() {
  local target=$1 what=$2 got=""
  for _ in $(seq 1 10); do
    got="$(seen "$target")"
    [ -z "$got" ] && { ok "${what}: refused"; return; }
    sleep 1
  done
  fail "${what} (${target}): expected no connection, the server saw ${got}"
}
expect_event() {
  local namespace=$1 name=$2 reason=$3
  for _ in $(seq 1 30); do
    if k get events.events.k8s.io -n "$namespace" \
      -o jsonpath='{range .items[*]}{.regarding.name} {.reason}{"\n"}{end}' |
      grep -qx "${name} ${reason}"; then
      ok "Event ${reason} on Service ${namespace}/${name}"
      return
    fi
    sleep 1
  done
  fail "no ${reason} Event on Service ${namespace}/${name}"
}
render() { sed "s/@SERVER_IP@/${SERVER_IP}/g" "$HERE/manifests/$1"; }

step "ClusterIP: seed 000 as published (its slice port has no name)"
render 000-proxy-service.yaml | k apply -f -
CLUSTER_IP="$(k -n proxy-test get service proxy-service -o jsonpath='{.spec.clusterIP}')"
expect_event proxy-test proxy-service PortNameMismatch
expect_refused "${CLUSTER_IP}:80" "ClusterIP without matching endpoint port"

step "ClusterIP: the slice's port named http, as kube-proxy requires"
k -n proxy-test patch endpointslice proxy-service --type=json \
  -p '[{"op":"add","path":"/ports/0/name","value":"http"}]'
expect_seen "${CLUSTER_IP}:80" "$WORKER_IP" "ClusterIP ${CLUSTER_IP}:80"

step "NodePort: the same Service as type NodePort (${NODE_PORT})"
k -n proxy-test patch service proxy-service -p \
  "{\"spec\":{\"type\":\"NodePort\",\"ports\":[{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\",\"targetPort\":80,\"nodePort\":${NODE_PORT}}]}}"
# The pod reaches the other node's NodePort: that node proxies, with its own address.
expect_seen "${CONTROL_PLANE_IP}:${NODE_PORT}" "$CONTROL_PLANE_IP" "NodePort on ${CONTROL_PLANE} from a pod"
got="$(docker run --rm --network kind --entrypoint sh alpine/socat -c \
  "printf 'GET / HTTP/1.0\r\n\r\n' | socat -T3 - TCP:${WORKER_IP}:${NODE_PORT}" 2>/dev/null |
  tr -d '\r' | tail -n 1 || true)"
[ "$got" = "$WORKER_IP" ] ||
  fail "NodePort on ${WORKER} from outside the cluster: the server saw '${got:-no connection}', expected ${WORKER_IP}"
ok "NodePort on ${WORKER} from outside the cluster: the server saw ${got}"

step "LoadBalancer: seed 001 (legacy Endpoints, loadBalancerSourceRanges 1.2.3.4/32)"
render 001-myapp-proxy.yaml | k apply -f -
k -n default patch service myapp-proxy --subresource=status --type=merge \
  -p "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"${LB_IP}\"}]}}}"
expect_refused "${LB_IP}:80" "LoadBalancer ${LB_IP} from a client outside 1.2.3.4/32"
# The pod's traffic leaves the node masqueraded (kindnet) or not: admit both its address and
# the node's.
k -n default patch service myapp-proxy --type=merge -p \
  "{\"spec\":{\"loadBalancerSourceRanges\":[\"1.2.3.4/32\",\"${WORKER_IP}/32\",\"${POD_CIDR}\"]}}"
expect_seen "${LB_IP}:80" "$WORKER_IP" "LoadBalancer ${LB_IP} from an admitted client"

step "kube-proxy is unaffected"
k exec client -- nslookup kubernetes.default.svc.cluster.local >/dev/null ||
  fail "cluster DNS (a kube-proxy Service) does not answer"
ok "cluster DNS answers through kube-proxy"

step "metrics"
pod="$(k -n extproxy-system get pods -l app.kubernetes.io/name=extproxy \
  --field-selector "spec.nodeName=${WORKER}" -o jsonpath='{.items[0].metadata.name}')"
metrics="$(k get --raw "/api/v1/namespaces/extproxy-system/pods/${pod}:9464/proxy/metrics")"
for line in 'extproxy_ready 1' 'extproxy_services_claimed{reason="label"} 2'; do
  grep -qxF "$line" <<<"$metrics" || fail "metrics of ${pod} lack: ${line}"
  ok "metrics: ${line}"
done

step "a rollout restart keeps serving"
k -n extproxy-system rollout restart daemonset/extproxy
k -n extproxy-system rollout status daemonset/extproxy --timeout=180s ||
  fail "the restarted DaemonSet did not become ready"
expect_seen "${CLUSTER_IP}:80" "$WORKER_IP" "ClusterIP after the restart"

printf '\nPASS: kind tests\n'
