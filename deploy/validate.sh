#!/usr/bin/env bash
# Offline checks of what deploy/ ships. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")"
command -v promtool >/dev/null || { echo "promtool is required (apt-get install prometheus)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The PrometheusRule's spec is a plain rules file one indentation level down.
sed -n '/^spec:/,$p' alerts/prometheusrule.yaml | tail -n +2 | sed 's/^  //' >"$work/rules.yaml"
grep -q '^groups:' "$work/rules.yaml" || { echo "alerts/prometheusrule.yaml: no spec.groups" >&2; exit 1; }
cp alerts/tests.yaml "$work/tests.yaml"
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules tests.yaml)
echo "deploy: alert rules check and pass their tests"
