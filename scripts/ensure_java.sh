#!/usr/bin/env bash
# TextWorldExpress runs on the JVM: make sure a Java runtime >= 11 is on PATH (installs
# OpenJDK 17 with apt when it is missing and we are root).
set -euo pipefail
version() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if command -v java >/dev/null 2>&1 && [ "$(version)" -ge 11 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null
else
  echo "TextWorldExpress needs Java >= 11 on PATH (e.g. apt-get install openjdk-17-jre-headless)" >&2
  exit 1
fi
