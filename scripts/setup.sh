#!/usr/bin/env bash
# Installs what extproxy needs to build and test on Debian 12 (bookworm), as root. Idempotent:
# a second run only checks. Used by README's commands and by CI.
set -euo pipefail

EBPF_TOOLCHAIN=nightly-2026-05-19   # its LLVM (22) must match bpf-linker's; newer nightlies use 23
BPF_LINKER_VERSION=0.13.0

log() { printf '\n== %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh installs packages: run it as root" >&2
  exit 1
fi

log "Debian packages"
export DEBIAN_FRONTEND=noninteractive
pkgs=(
  # bpf-linker against Debian's LLVM 22
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  # build basics
  build-essential pkg-config git ca-certificates curl
  # tests and the demo: namespaces, veths, offload switches, traffic; xz unpacks the
  # Kubernetes binaries the API server tests run (../shared/k8s)
  iproute2 ethtool socat xz-utils
  # benchmarks: the contenders and the load generators
  iptables nftables iperf3 wrk sockperf linux-perf
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

log "Rust toolchains"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
  export PATH="$HOME/.cargo/bin:$PATH"
fi
rustup toolchain list | grep -q '^stable' || rustup toolchain install stable --profile minimal
rustup component list --toolchain stable --installed | grep -q '^clippy' || rustup component add clippy rustfmt --toolchain stable
rustup toolchain list | grep -q "^${EBPF_TOOLCHAIN}" || \
  rustup toolchain install "${EBPF_TOOLCHAIN}" --component rust-src --profile minimal
rustup component list --toolchain "${EBPF_TOOLCHAIN}" --installed | grep -q '^rust-src' || \
  rustup component add rust-src --toolchain "${EBPF_TOOLCHAIN}"
rustup component list --toolchain "${EBPF_TOOLCHAIN}" --installed | grep -q '^clippy' || \
  rustup component add clippy --toolchain "${EBPF_TOOLCHAIN}"

log "bpf-linker"
if ! bpf-linker --version 2>/dev/null | grep -q "${BPF_LINKER_VERSION}"; then
  # Without LLVM_PREFIX it finds an older llvm-config on the PATH and fails to build.
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
    --no-default-features --features llvm-22
fi

log "bpffs"
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

log "ready: $(cargo --version), ${EBPF_TOOLCHAIN}, $(bpf-linker --version)"
