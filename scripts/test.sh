#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: installs what it needs, then format check,
# clippy with -D warnings, the offline validation of deploy/, and every test (real git,
# real mTLS, the real coordinator and agent binaries on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

# A target directory cache outside the clone speeds CI up when present; never required.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /work/.cache/coffer-target ] && [ -w /work/.cache/coffer-target ]; then
  export CARGO_TARGET_DIR=/work/.cache/coffer-target
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
if [ -x deploy/validate.sh ]; then
  echo "== deploy/ validation"
  bash deploy/validate.sh
fi
echo "== build binaries"
cargo build --workspace --bins --locked
echo "== tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
