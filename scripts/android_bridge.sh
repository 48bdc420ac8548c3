#!/usr/bin/env bash
# Build and test android_bridge/ (the Kotlin Android client library) with Maven: compile
# against the Android framework jar, the codec vector tests, the Robolectric tests (offline:
# the android-all jar is copied into target/ by Maven first) and the library jar.
# Needs a JDK (17) and Maven; the first run downloads the dependencies into ~/.m2.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v mvn >/dev/null 2>&1; then
    # Machines of this project's kind ship Maven and JDK 17; elsewhere take Debian's (root).
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends maven openjdk-17-jdk-headless >/dev/null
    else
        echo "[android_bridge] mvn not found: install Maven and a JDK 17" >&2
        exit 1
    fi
fi
exec mvn -B -q -Dstyle.color=never -f "$here/android_bridge/pom.xml" -Drobolectric.offline=true "$@" verify
