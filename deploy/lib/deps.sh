# SPDX-License-Identifier: Apache-2.0
# Sourced by deploy/quickstart.sh and tests/run.sh: installs, with apt, the Debian 12
# packages ferry builds and tests with. Safe to run again: when everything is present it
# does not touch apt at all.

FERRY_BUILD_PACKAGES=(
  build-essential cmake pkg-config git
  libibverbs-dev librdmacm-dev rdma-core ibverbs-providers
  liburing-dev libyaml-dev libssl-dev libmicrohttpd-dev libjansson-dev libcurl4-openssl-dev curl jq openssl
  libcmocka-dev libzstd-dev libsystemd-dev
  qemu-system-x86 kmod cpio iproute2
)

ferry_need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "ferry: this script needs root (it installs packages and uses /dev/kvm); run it with sudo" >&2
    exit 1
  fi
}

# ferry_install_deps [extra packages...]
ferry_install_deps() {
  local pkgs=("${FERRY_BUILD_PACKAGES[@]}" "$@") missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "ferry: build dependencies already installed"
    return 0
  fi
  echo "ferry: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ferry_check_kvm() {
  if [ ! -c /dev/kvm ] || ! { exec 9<>/dev/kvm; } 2>/dev/null; then
    echo "ferry: /dev/kvm is missing or not accessible; ferry runs VMs with KVM" >&2
    return 1
  fi
  exec 9>&-
}
