#!/usr/bin/env bash
# Checks endpointlag's Prometheus rules and runs their unit tests with promtool (Debian's
# prometheus package has it: apt-get install prometheus). Exits non-zero when either fails.
# PROMTOOL names another promtool binary.
set -euo pipefail
cd "$(dirname "$0")"
promtool=${PROMTOOL:-promtool}
if ! command -v "$promtool" >/dev/null; then
  echo "rules: $promtool not found (apt-get install prometheus, or set PROMTOOL)" >&2
  exit 1
fi
"$promtool" check rules endpointlag.rules.yaml
"$promtool" test rules endpointlag.rules_test.yaml
