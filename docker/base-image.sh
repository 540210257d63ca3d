#!/usr/bin/env bash
# A Debian base image for machines that cannot pull `python:3.11-slim`: debootstrap a minimal
# bookworm (python3 + venv, from Debian's packages only) and `docker import` it.
#
#   sudo docker/base-image.sh                      # -> image fedmm-base:bookworm
#   docker build --build-arg BASE=fedmm-base:bookworm -f docker/site.Dockerfile -t fedmm-site .
#
# Environment: IMAGE (default fedmm-base:bookworm), SUITE (bookworm), DEBIAN_MIRROR
# (http://deb.debian.org/debian), DOCKER (docker; e.g. "docker -H unix:///run/other.sock").
# Needs root, debootstrap and a reachable Debian mirror (or a local one); nothing else.
set -euo pipefail

IMAGE=${IMAGE:-fedmm-base:bookworm}
SUITE=${SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/fedmm-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

echo "[base-image] debootstrap $SUITE (minbase + python3, python3-venv) from $DEBIAN_MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# what a container image does not need: package caches, lists, docs, logs
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/log/*

echo "[base-image] docker import -> $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | $DOCKER import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
$DOCKER run --rm --network none "$IMAGE" python3 -c \
    'import sys, venv, ensurepip; print("[base-image] python", sys.version.split()[0])'
$DOCKER image ls "$IMAGE" --format '[base-image] {{.Repository}}:{{.Tag}} {{.Size}}'
