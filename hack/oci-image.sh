#!/usr/bin/env bash
# Builds a small OCI image archive without Docker: a root filesystem staged from host files, packed
# with umoci into an OCI layout, tarred (the form `ctr images import` and `skopeo copy oci-archive:`
# read). `make image-oci` builds the operator image with it (the same binary path, user and
# entrypoint as the Dockerfile's distroless image); the real-node tests build the registry-proxy and
# Envoy images with it from Debian's Distribution binary and pip's Envoy binary.
#
#   hack/oci-image.sh --out TAR --ref NAME:TAG --user UID:GID --entrypoint PATH [--cmd ARG]...
#                     [--bin SRC:DST]... [--file SRC:DST]... [--env K=V]... [--workdir DIR]
#
#   --bin SRC:DST   an ELF executable, plus every shared library `ldd` names and its loader, at the
#                   same paths as on this host (so the image runs on a host of the same libc)
#   --file SRC:DST  any file, mode kept
#   always          /etc/passwd and /etc/group with root and nonroot (65532), /etc/nsswitch.conf,
#                   a world-writable /tmp, and /etc/ssl/certs/ca-certificates.crt from this host
#
# Every file gets the same fixed mtime, so the same inputs give the same layer digests.
set -euo pipefail

out="" ref="" user="" entrypoint="" workdir="/"
cmd=() bins=() files=() envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --user) user="$2"; shift 2 ;;
    --entrypoint) entrypoint="$2"; shift 2 ;;
    --cmd) cmd+=("$2"); shift 2 ;;
    --bin) bins+=("$2"); shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    *) echo "oci-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in out ref user entrypoint; do
  [ -n "${!v}" ] || { echo "oci-image.sh: --$v is required" >&2; exit 2; }
done
command -v umoci >/dev/null || { echo "oci-image.sh: umoci is not installed (apt-get install umoci)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root"/{etc/ssl/certs,tmp,home/nonroot,usr/local/bin}
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/home/nonroot"

# The distroless base's users, so `USER 65532` has a name and a home.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
echo "hosts: files dns" >"$root/etc/nsswitch.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"

copy() { # SRC DST
  mkdir -p "$root$(dirname "$2")"
  cp -L --preserve=mode "$1" "$root$2"
}
for spec in "${bins[@]}"; do
  src="${spec%%:*}" dst="${spec#*:}"
  copy "$src" "$dst"
  # Static binaries make ldd answer "not a dynamic executable" (exit 1): nothing to add.
  { ldd "$src" 2>/dev/null || true; } | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
    copy "$lib" "$lib"
  done
done
for spec in "${files[@]}"; do
  copy "${spec%%:*}" "${spec#*:}"
done
# Debian's umoci 0.4.7 ends a layer without the last file's padding and the end-of-archive blocks:
# when the last entry (paths go in lexical order) is a regular file whose size is not a multiple of
# 512, the layer is truncated and containerd refuses it. An empty directory that sorts after every
# other path keeps the last entry free of content; the check after packing makes sure.
mkdir -p "$root/var/~end"
find "$root" -exec touch -h -d @946684800 {} +

layout="$work/layout"
tag="${ref##*:}"
created="2000-01-01T00:00:00Z"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci insert --image "$layout:$tag" --history.created "$created" --history.created_by "hack/oci-image.sh" "$root" /
config=(--config.user "$user" --config.entrypoint "$entrypoint" --config.workingdir "$workdir"
  --os linux --architecture "$(case "$(uname -m)" in x86_64) echo amd64 ;; aarch64) echo arm64 ;; *) uname -m ;; esac)"
  --created "$created" --no-history --author mirrorfleet)
for c in "${cmd[@]}"; do config+=(--config.cmd "$c"); done
config+=(--config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
for e in "${envs[@]}"; do config+=(--config.env "$e"); done
umoci config --image "$layout:$tag" "${config[@]}"
umoci gc --layout "$layout"
for blob in "$layout"/blobs/sha256/*; do
  if gzip -t "$blob" 2>/dev/null && ! gzip -dc "$blob" | tar -t >/dev/null 2>&1; then
    echo "oci-image.sh: umoci wrote a truncated layer ($blob)" >&2
    exit 1
  fi
done
mkdir -p "$(dirname "$out")"
tar --sort=name --mtime=@946684800 --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "oci-image.sh: $ref -> $out ($(du -h "$out" | cut -f1))"
