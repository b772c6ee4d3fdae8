#!/usr/bin/env bash
# Puts a headless Chromium on PATH (Debian's `chromium` package) for the test
# that renders the curation report (tests/curate_synthetic.rs), and makes
# that test required. Needs root for apt-get when chromium is missing.
# Sourced by scripts/test.sh; runnable alone.
set -euo pipefail
if ! command -v chromium > /dev/null; then
    echo "== installing chromium (Debian package) for the report.html test"
    if [ "$(id -u)" != 0 ]; then
        echo "chromium is not installed and apt-get needs root: run 'apt-get install chromium' as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null
fi
export PLATYPUS_REQUIRE_CHROMIUM=1
