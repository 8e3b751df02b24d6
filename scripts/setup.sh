#!/usr/bin/env bash
# One idempotent set-up for `make run` and `make test` on Debian/Ubuntu: system packages, the
# kernel headers BCC compiles against, the agent's system user, a venv and the package.
# Each step checks before it acts, so a second run takes a second or two.
#
# The container image (deploy/Dockerfile) runs this same script, so the image and `make run`
# cannot drift. Its switches (unset, every step runs, as for make run and make test):
#   PARCA_AGENT_SETUP_RUNTIME_ONLY=1  no test-only packages (Go, Chromium, the [test] extras)
#   PARCA_AGENT_SETUP_NO_HEADERS=1    no headers link: at image build the node's kernel is unknown
#   PARCA_AGENT_SETUP_ONLY=headers    only the headers link (deploy/entrypoint.sh, at start)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev python3-bpfcc bpfcc-tools bpftool linux-perf
  linux-headers-amd64 libsystemd-dev pkg-config gcc g++ make binutils
)
TEST_APT_PACKAGES=(golang-go chromium chromium-driver)
PIP_TARGET='.[test]'
if [ "${PARCA_AGENT_SETUP_RUNTIME_ONLY:-}" = 1 ]; then
  PIP_TARGET='.'
else
  APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
fi

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (installs apt packages, links kernel headers); try: sudo make $*" >&2
    exit 1
  fi
}

# BCC compiles against /lib/modules/$(uname -r)/build. When the running kernel has no headers
# package (these machines run 6.18; Debian ships 6.1), link Debian's generic headers: the
# perf-event program uses only stable types.
link_kernel_headers() {
  kdir="/lib/modules/$(uname -r)"
  if [ ! -e "$kdir/build/include" ]; then
    need_root
    if ! apt-get install -y -qq "linux-headers-$(uname -r)" >/dev/null 2>&1; then
      arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
      common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
      if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        echo "setup: no kernel headers found under /usr/src; install linux-headers-amd64" >&2
        exit 1
      fi
      mkdir -p "$kdir"
      ln -sfn "$arch_dir" "$kdir/build"
      ln -sfn "$common_dir" "$kdir/source"
      echo "setup: linked $kdir/build -> $arch_dir, source -> $common_dir"
    fi
  fi
}

if [ "${PARCA_AGENT_SETUP_ONLY:-}" = headers ]; then
  link_kernel_headers
  exit 0
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "${PARCA_AGENT_SETUP_NO_HEADERS:-}" != 1 ]; then
  link_kernel_headers
fi

# The unprivileged services run as this user; its group may read the run directory and caches.
if ! getent group parca-agent >/dev/null; then
  need_root; groupadd --system parca-agent
fi
if ! getent passwd parca-agent >/dev/null; then
  need_root
  useradd --system --gid parca-agent --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin parca-agent
fi

# The venv sits on Debian's python3 with system site packages, because bcc comes only from
# Debian's python3-bpfcc.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "$PIP_TARGET"
  touch "$stamp"
fi
# Generated protobuf code is rebuilt when a .proto changes.
.venv/bin/python -m services.proto_build
