#!/usr/bin/env bash
# System packages the test suite uses beyond pip: Debian's PostgreSQL server binaries for the
# services tests' production profile (tests/test_services.py). Installs only what is missing and
# only as root with apt-get; otherwise those tests skip and say why.
set -euo pipefail
if command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's postgresql for the services tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
else
  echo "postgresql binaries missing and apt-get unavailable: the PostgreSQL services test will skip"
fi
