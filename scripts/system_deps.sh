#!/bin/sh
# Debian packages the test suite needs: Chromium (coordinator page test), Docker engine + compose
# and debootstrap (docker-compose end-to-end test), iproute2 (tc inside containers).
# Installs only what is missing; needs root (or sudo) and apt.
set -eu
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v dockerd >/dev/null 2>&1 || need="$need docker.io"
{ command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; } || need="$need docker-compose"
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
command -v tc >/dev/null 2>&1 || need="$need iproute2"
[ -z "$need" ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages:$need"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
