#!/bin/sh
# The container's entrypoint (deploy/Dockerfile): make the running kernel's headers visible to
# BCC, then become `parca-agent` (exec: it stays PID 1, whose SIGTERM handler stops supervisord
# and the five services). `entrypoint.sh healthcheck` is the image's HEALTHCHECK.
#
# Only the node's kernel decides which headers fit, so this happens at start, not at build.
# The node's /lib/modules and /usr/src are expected under $PARCA_AGENT_HOST_ROOT (default /host,
# as deploy/kubernetes mounts them): mounted there rather than over the image's own, so the
# image keeps its Debian headers as the fallback and can link into its own /lib/modules.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
host_root=${PARCA_AGENT_HOST_ROOT:-/host}
modules=${PARCA_AGENT_MODULES_DIR:-/lib/modules}
release=$(uname -r)

if [ "${1:-}" = healthcheck ]; then
  # The port comes from the same parser as the agent's, so PARCA_AGENT_HTTP_ADDRESS moves both.
  exec "$root/.venv/bin/python" - <<'EOF'
import os, sys, urllib.request
from services.settings import parse_host_port
host, port = parse_host_port(os.environ.get("PARCA_AGENT_HTTP_ADDRESS") or ":8080")
host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
host = f"[{host}]" if ":" in host else host
try:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except OSError as e:
    print(f"healthcheck: {e}", file=sys.stderr)
    sys.exit(1)
EOF
fi

# Where a path of the node's file system is in this container: symlinks on the node hold node
# paths (Debian's build -> /usr/src/linux-headers-...), so each hop is put back under host_root.
on_host() {
  path=$host_root$1
  hops=0
  while [ -L "$path" ] && [ $hops -lt 16 ]; do
    target=$(readlink "$path")
    case $target in
      /*) path=$host_root$target ;;
      *) path=$(dirname "$path")/$target ;;
    esac
    hops=$((hops + 1))
  done
  printf '%s\n' "$path"
}

link_headers() {
  kdir=$modules/$release
  if [ -e "$kdir/build/include" ]; then
    return  # on a host with headers, or a runtime that mounted them at the usual place
  fi
  build=$(on_host "/lib/modules/$release/build")
  if [ -e "$build/include" ]; then
    mkdir -p "$kdir"
    ln -sfn "$build" "$kdir/build"
    src_dir=$(on_host "/lib/modules/$release/source")
    if [ -e "$src_dir/include" ]; then
      ln -sfn "$src_dir" "$kdir/source"
    fi
    echo "entrypoint: using the node's kernel headers: $kdir/build -> $build" >&2
    return
  fi
  if [ -e /sys/kernel/kheaders.tar.xz ]; then
    return  # the kernel carries its own headers (CONFIG_IKHEADERS); BCC extracts them itself
  fi
  # No exact headers: link the image's Debian generic ones, as `make run` does on a host.
  PARCA_AGENT_SETUP_ONLY=headers bash "$root/scripts/setup.sh"
}

link_headers

# With hostPID, /proc/1 is the node's init. Its cgroup namespace makes /proc/<pid>/cgroup show
# whole paths (a private one shows "/../.." for the pods), which discovery matches against the
# node's /sys/fs/cgroup. Without hostPID, /proc/1 is this process and nothing changes.
agent=$root/.venv/bin/parca-agent
init_ns=$(readlink /proc/1/ns/cgroup 2>/dev/null || true)
if [ "$init_ns" != "$(readlink /proc/self/ns/cgroup)" ] \
  && nsenter --cgroup=/proc/1/ns/cgroup true 2>/dev/null; then
  exec nsenter --cgroup=/proc/1/ns/cgroup -- "$agent" "$@"
fi
exec "$agent" "$@"
