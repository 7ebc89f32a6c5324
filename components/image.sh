#!/usr/bin/env bash
# The project image on a machine that may have no Docker engine, no base image and no registry:
#
#   components/image.sh build IMAGE [BASE]   engine, base, wheels, `docker build`; prints time and size
#   components/image.sh engine               a Docker engine that answers (installs and starts one if needed)
#   components/image.sh stop-engine          stops the engine only if `engine` started it
#
# Wheels (PIP_SOURCE): `wheelhouse` (default) downloads the lock with this host's pip (its index,
# proxy and CA settings) into $WHEELHOUSE and serves it on 127.0.0.1 to the build; `index`
# lets the build's pip reach the index itself, trusting CA_BUNDLE (default: the system bundle).
# Either way only the packages stage sees the pip settings and the bundle; the final image
# copies the finished virtual environment out of it.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=build/engine
LOCAL_BASE=mapet-base:bookworm
PACKAGES_STAGE=mapet-build/packages:latest
REGISTRY_BASE=${REGISTRY_BASE:-python:3.11-slim-bookworm}
PIP_SOURCE=${PIP_SOURCE:-wheelhouse}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
WHEELHOUSE=${WHEELHOUSE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mapet/wheelhouse}   # one per machine, for every clone
WHEELHOUSE_PORT=${WHEELHOUSE_PORT:-38461}
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

say() { echo "image: $*" >&2; }
fail() { say "error: $*"; exit 1; }

engine() {
    if docker info >/dev/null 2>&1; then return; fi
    if ! command -v dockerd >/dev/null; then
        say "no Docker engine: installing Debian's docker.io"
        $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
    fi
    mkdir -p "$STATE"
    say "starting dockerd (log: $STATE/dockerd.log)"
    # No iptables and no default bridge here: builds use the host's network, containers the
    # networks that the tests create.
    $SUDO dockerd --iptables=false --bridge=none >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null || break
        sleep 1
    done
    tail -n 20 "$STATE/dockerd.log" >&2
    fail "dockerd did not answer within 60 s"
}

stop_engine() {
    [ -f "$STATE/dockerd.pid" ] || return 0
    local pid
    pid=$(cat "$STATE/dockerd.pid")
    if kill "$pid" 2>/dev/null; then
        say "stopping the dockerd this script started (pid $pid)"
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$STATE/dockerd.pid"
}

# The base to build on, into BASE_IMAGE: the given one if any; else a registry's Python bookworm
# image if one answers; else a Debian bookworm made here with debootstrap and imported (about a
# minute, once). A variable, not an echo: apt and docker print on stdout along the way.
base() {
    local given=${1:-}
    if [ -n "$given" ]; then
        docker image inspect "$given" >/dev/null 2>&1 || docker pull -q "$given" \
            || fail "BASE=$given is neither a local image nor pullable"
        BASE_IMAGE=$given; return
    fi
    if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then BASE_IMAGE=$LOCAL_BASE; return; fi
    if docker image inspect "$REGISTRY_BASE" >/dev/null 2>&1 \
        || timeout 60 docker pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
        BASE_IMAGE=$REGISTRY_BASE; return
    fi
    say "no registry answers: making $LOCAL_BASE with debootstrap"
    command -v debootstrap >/dev/null || { $SUDO apt-get update -q && $SUDO apt-get install -y -q debootstrap; }
    local root
    root=$(mktemp -d /tmp/mapet-base.XXXXXX)
    $SUDO debootstrap --variant=minbase bookworm "$root" >"$root.log" 2>&1 \
        || { $SUDO rm -rf "$root"; tail -n 20 "$root.log" >&2; fail "debootstrap failed (log: $root.log)"; }
    $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    $SUDO tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
    $SUDO rm -rf "$root" "$root.log"
    BASE_IMAGE=$LOCAL_BASE
}

# build/pip/pip.conf (and ca.crt) for the packages stage.
pip_settings() {
    rm -rf build/pip && mkdir -p build/pip
    case "$PIP_SOURCE" in
    wheelhouse)
        local stamp
        stamp=$(sha256sum requirements.lock | cut -c1-64)
        if [ "$(cat "$WHEELHOUSE/.lock-sha256" 2>/dev/null)" != "$stamp" ]; then
            say "wheels of requirements.lock -> $WHEELHOUSE (this host's pip; sdists built into wheels)"
            rm -rf "$WHEELHOUSE"                            # another lock's wheels: the build would not reuse them
            mkdir -p "$WHEELHOUSE"
            python3 -m pip wheel -q --disable-pip-version-check --no-deps -r requirements.lock -w "$WHEELHOUSE" \
                2> >(grep -v "^WARNING: Location" >&2)
            echo "$stamp" >"$WHEELHOUSE/.lock-sha256"
        fi
        printf '[global]\nno-index = true\nfind-links = http://127.0.0.1:%s/\n' "$WHEELHOUSE_PORT" >build/pip/pip.conf
        ;;
    index)
        [ -f "$CA_BUNDLE" ] || fail "CA_BUNDLE=$CA_BUNDLE: no such file"
        cp "$CA_BUNDLE" build/pip/ca.crt
        printf '[global]\ncert = /etc/mapet-build/ca.crt\n' >build/pip/pip.conf
        ;;
    *) fail "PIP_SOURCE=$PIP_SOURCE: choose wheelhouse or index" ;;
    esac
}

build() {
    local image=${1:?usage: image.sh build IMAGE [BASE]} started server=""
    started=$(date +%s)
    engine
    base "${2:-}"
    pip_settings
    if [ "$PIP_SOURCE" = wheelhouse ]; then
        python3 -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$WHEELHOUSE_PORT" >/dev/null 2>&1 &
        server=$!
        trap "kill $server 2>/dev/null || true" EXIT
        for _ in $(seq 50); do
            python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$WHEELHOUSE_PORT/')" \
                2>/dev/null && break
            sleep 0.1
        done
    fi
    say "building $image on $BASE_IMAGE"
    # The packages stage is tagged, so that pruning keeps it as the next build's cache. It holds the
    # build's pip settings: a local image, never to be pushed.
    docker build --network host --force-rm --build-arg "BASE=$BASE_IMAGE" -f components/Dockerfile \
        --target packages -t "$PACKAGES_STAGE" .
    docker build --network host --force-rm --build-arg "BASE=$BASE_IMAGE" -f components/Dockerfile -t "$image" .
    rm -rf build/pip
    # What the next build cannot reuse: earlier builds of this tag and the stages only they used.
    docker image prune -f >/dev/null
    local size
    size=$(docker image inspect -f '{{.Size}}' "$image")
    say "built $image in $(( $(date +%s) - started )) s: $(( size / 1000000 )) MB"
}

case "${1:-}" in
build) shift; build "$@" ;;
engine) engine ;;
stop-engine) stop_engine ;;
*) fail "usage: $0 build IMAGE [BASE] | engine | stop-engine" ;;
esac
