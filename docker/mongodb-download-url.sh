#!/bin/sh
# Prints the official download URL of a MongoDB component for the platform this image is built on, or
# fails naming the platforms MongoDB builds it for. Used by the Dockerfile; tested by tests/test_dockerfile.py.
#
#   mongodb-download-url.sh tools|mongosync VERSION [OS_RELEASE_FILE] [ARCH]
#
# OS_RELEASE_FILE defaults to /etc/os-release, ARCH to `uname -m` (x86_64/amd64 or aarch64/arm64).
# Only platforms on the component's published platform list get a URL: a binary built for another
# distribution may start and still fail later (another glibc or OpenSSL), which is worse than a build error.
#   Database Tools 100.19/100.20: Debian 12 (x86_64 only), Ubuntu 20.04/22.04/24.04 (x86_64, arm64).
#   mongosync 1.22: Ubuntu 20.04/22.04/24.04, RHEL 7-9, Amazon Linux 2/2023 on x86_64; arm64 only as
#   Amazon Linux 2023 ARM64. No Debian build at all.
set -eu

component="${1:?usage: mongodb-download-url.sh tools|mongosync VERSION [OS_RELEASE_FILE] [ARCH]}"
version="${2:?the component version is required}"
os_release="${3:-/etc/os-release}"
arch="${4:-$(uname -m)}"
downloads="${MONGODB_DOWNLOADS:-https://fastdl.mongodb.org}"

case "$arch" in
  x86_64|amd64) arch=x86_64 ;;
  aarch64|arm64) arch=arm64 ;;
  *) echo "error: architecture '$arch' has no MongoDB $component build (x86_64 and arm64 only)" >&2; exit 2 ;;
esac

id=$(. "$os_release" && echo "${ID:-unknown}")
version_id=$(. "$os_release" && echo "${VERSION_ID:-unknown}")
platform="$id $version_id"

fail() {
  echo "error: MongoDB $component $version is not built for $platform on $arch. $1" >&2
  exit 2
}

case "$component" in
  tools)
    case "$id:$version_id" in
      debian:12)
        [ "$arch" = x86_64 ] || fail "The Database Tools' Debian 12 build is x86_64 only: build the image for \
linux/amd64, or pass --build-arg MONGODB_TOOLS_VERSION=none to leave the tools out (the built-in dump \
engine then copies; dump_engine=mongodump is refused)."
        echo "$downloads/tools/db/mongodb-database-tools-debian12-x86_64-$version.deb" ;;
      ubuntu:20.04|ubuntu:22.04|ubuntu:24.04)
        echo "$downloads/tools/db/mongodb-database-tools-ubuntu$(echo "$version_id" | tr -d .)-$arch-$version.deb" ;;
      *) fail "Supported here: Debian 12 (x86_64) and Ubuntu 20.04, 22.04, 24.04 (x86_64, arm64)." ;;
    esac ;;
  mongosync)
    case "$id:$version_id:$arch" in
      ubuntu:20.04:x86_64|ubuntu:22.04:x86_64|ubuntu:24.04:x86_64)
        echo "$downloads/tools/mongosync/mongosync-ubuntu$(echo "$version_id" | tr -d .)-x86_64-$version.tgz" ;;
      ubuntu:*:arm64)
        fail "mongosync's only arm64 build is for Amazon Linux 2023: build the mongosync image for linux/amd64." ;;
      *) fail "mongosync is built for Ubuntu 20.04, 22.04, 24.04, RHEL 7-9 and Amazon Linux 2/2023 (x86_64; \
arm64 only on Amazon Linux 2023), not for Debian: the mongosync image is based on Ubuntu 24.04." ;;
    esac ;;
  *) echo "error: unknown component '$component' (tools or mongosync)" >&2; exit 2 ;;
esac
