#!/usr/bin/env bash
# Quickstart on a fresh Debian 12 machine: builds Coffer, starts a coordinator on its
# embedded defaults (development CA, SQLite catalog, data in ./quickstart/coffer-data),
# backs up a sample GitOps repository twice with agent-git, restores the latest snapshot,
# verifies it (git fsck + exact refs) and the repository (coordinator verify), and prints
# what happened and where everything is.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
qs="${COFFER_QUICKSTART_DIR:-$root/quickstart}"

bash "$root/scripts/install-deps.sh"
echo "== building (release)"
cargo build --release --locked -q -p coffer-coordinator -p coffer-agent-git --manifest-path "$root/Cargo.toml"
bin="${CARGO_TARGET_DIR:-$root/target}/release"

rm -rf "$qs" && mkdir -p "$qs" && cd "$qs"
cleanup() { [ -n "${coord_pid:-}" ] && kill "$coord_pid" 2>/dev/null && wait "$coord_pid" 2>/dev/null || true; }
trap cleanup EXIT

echo "== starting the coordinator (embedded defaults)"
port=7443
if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then port=0; fi
metrics=9464
if (exec 3<>/dev/tcp/127.0.0.1/$metrics) 2>/dev/null; then metrics=0; fi
"$bin/coordinator" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" > coordinator.out 2> coordinator.log &
coord_pid=$!
for _ in $(seq 1 300); do
  grep -q "coordinator listening on" coordinator.out 2>/dev/null && break
  kill -0 "$coord_pid" 2>/dev/null || { cat coordinator.out coordinator.log; exit 1; }
  sleep 0.1
done
cat coordinator.out
url=$(sed -n 's/^coordinator listening on \(https:[^ ]*\).*/\1/p' coordinator.out)

echo "== a sample GitOps repository in $qs/gitops"
g() { git -C "$qs/gitops" -c user.name=Quickstart -c user.email=quickstart@example.com "$@"; }
mkdir -p gitops/apps/web gitops/clusters/prod
git init -q -b main gitops
printf 'apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n' > gitops/apps/web/deployment.yaml
printf 'creation_rules:\n  - path_regex: .*secret.*\\.yaml$\n    age: age1examplerecipient\n' > gitops/.sops.yaml
printf 'apiVersion: v1\nkind: Secret\ndata:\n  password: ENC[AES256_GCM,data:Zm9v,iv:YmFy,tag:YmF6,type:str]\nsops:\n  version: 3.8.1\n' > gitops/clusters/prod/db-secret.yaml
g add -A && g commit -qm "initial platform config" && g tag -a v1 -m "release 1"

agent=("$bin/agent-git" --coordinator "$url" --asset git/gitops --repo "$qs/gitops" --identity "$qs/agent-identity.txt" --work-dir "$qs/agent-work")
echo "== first backup"
"${agent[@]}" backup
echo "== a new commit, second (incremental) backup"
printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n' > gitops/apps/web/service.yaml
sed -i 's/replicas: 2/replicas: 3/' gitops/apps/web/deployment.yaml
g add -A && g commit -qm "scale web, add service"
"${agent[@]}" backup
echo "== snapshots"
"${agent[@]}" list
echo "== restore the latest snapshot into $qs/restored.git and verify it"
"${agent[@]}" restore --snapshot latest --to "$qs/restored.git"
echo "== verify the repository's stored chunks (no keys needed)"
"$bin/coordinator" verify --data-dir "$qs/coffer-data"

kill "$coord_pid" && wait "$coord_pid" || true
coord_pid=""
cat <<MSG

Done. What happened: a coordinator started on embedded defaults, agent-git mirrored
$qs/gitops, cut it into encrypted, deduplicated chunks, uploaded them over mutual TLS,
committed two signed snapshots (the second only uploaded the new objects), restored the
latest into a bare repository, and checked it with git fsck and an exact comparison of refs.

Where things are:
  repository (packs, manifests, keyrings)  $qs/coffer-data/repo
  catalog (SQLite)                         $qs/coffer-data/catalog.db
  development CA and certificates          $qs/coffer-data/certs
  agent identity (age; keep it secret)     $qs/agent-identity.txt
  restored repository                      $qs/restored.git
  coordinator logs                         $qs/coordinator.log

Next: start it again with
  (cd $qs && $bin/coordinator serve)
and ask it about its assets with grpcurl and the admin certificate:
  grpcurl -cacert $qs/coffer-data/certs/ca.pem -cert $qs/coffer-data/certs/admin-admin.pem \\
    -key $qs/coffer-data/certs/admin-admin.key 127.0.0.1:7443 coffer.v1.AdminService/ListAssets
its Prometheus metrics (freshness, expected intervals, attempts):
  curl -s http://127.0.0.1:9464/metrics
and its retention matrix:
  $bin/coordinator policy show
MSG
