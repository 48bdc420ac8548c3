#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser tests, from Debian's packages (never a browser
# build downloaded by a test tool). Idempotent: does nothing when /usr/bin/chromium exists.
# apt needs its package lists first, so `apt-get update` runs before the install.
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if [[ "$(id -u)" != "0" ]]; then
    echo "scripts/chromium.sh: installing chromium needs root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x /usr/bin/chromium
