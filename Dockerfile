# syntax=docker/dockerfile:1.7
# extproxy's image: build the agent (and its eBPF object) from this repository, ship only the
# binary on a slim Debian. Build from the repository root:
#   docker build -t extproxy:dev .
# The same toolchain recipe as scripts/setup.sh: stable Rust for the agent, nightly-2026-05-19
# (whose LLVM is 22) with rust-src for the BPF target, and bpf-linker built against LLVM 22.

FROM rust:1.95-bookworm AS build
ARG EBPF_TOOLCHAIN=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.13.0
ENV DEBIAN_FRONTEND=noninteractive
# LLVM 22 for bpf-linker. Where Debian's configured repositories carry it (they do on the hosts
# this project is built on), it comes from there; stock bookworm does not, so apt.llvm.org's
# bookworm repository is added only then.
RUN set -eux; \
    apt-get update; \
    if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then \
      apt-get install -y --no-install-recommends ca-certificates curl gnupg; \
      curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/apt.llvm.org.gpg; \
      echo "deb [signed-by=/usr/share/keyrings/apt.llvm.org.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
        > /etc/apt/sources.list.d/llvm-22.list; \
      apt-get update; \
    fi; \
    apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev; \
    rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install "${EBPF_TOOLCHAIN}" --profile minimal --component rust-src
# Without LLVM_PREFIX bpf-linker finds another llvm-config on the PATH and fails to build.
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build outputs between builds; the binary is copied out of
# the cached target directory because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    EXTPROXY_EBPF_TOOLCHAIN="${EBPF_TOOLCHAIN}" cargo build --release --locked -p proxy-user --bin extproxy \
    && install -D target/release/extproxy /out/extproxy

# bookworm-slim rather than distroless: the init container that mounts bpffs on hosts without
# one needs sh, grep and mount, and the binary links glibc.
FROM debian:bookworm-slim
# Root certificates for https health checks that verify (extproxy.io/health-check-verify).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/extproxy /usr/local/bin/extproxy
ENTRYPOINT ["/usr/local/bin/extproxy"]
CMD ["run", "--iface=auto"]
