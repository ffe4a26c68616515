#!/usr/bin/env bash
# Installs promtool (Prometheus' rule checker) for tests/chart.rs: it parses and unit-tests the
# chart's alert rules and parses the dashboard's queries. It comes from Debian's `prometheus`
# package, unpacked rather than installed: installing would also set up (and try to start) a
# Prometheus server, which the tests do not want. Installs into $PROMTOOL_INSTALL_DIR
# (default /usr/local/bin) unless a promtool is already on PATH.
set -euo pipefail
DEST="${PROMTOOL_INSTALL_DIR:-/usr/local/bin}"
if command -v promtool >/dev/null 2>&1; then
  echo "promtool already installed at $(command -v promtool)"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# (apt warns that it downloads unsandboxed as root into a root-owned temp dir; harmless.)
(cd "$work" && apt-get download prometheus >/dev/null)
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$DEST"
install -m 0755 "$work/root/usr/bin/promtool" "$DEST/promtool"
"$DEST/promtool" --version | head -1
