#!/usr/bin/env bash
# `make docker-e2e`: the shipped images and compose files train a federation of containers.
#
# Starts a Docker daemon of its own (no bridge, no iptables, private data root and socket),
# builds the server and site images offline from the wheelhouse, writes certificates with
# `fedmm certs` and demo data, runs the SuperLink and three sites as containers on the host
# network bound to 127.0.0.1 (docker/compose.yml + docker/compose.host.yml), trains 2 rounds
# over TLS + node authentication with `fedmm train`, then loads the saved adapter on a fresh
# backbone (`fedmm evaluate`: PeftModel.from_pretrained) and requires the server's accuracy
# back exactly. Every container and the daemon are stopped however it ends (Ctrl-C included).
#
# Needs root, dockerd/docker (Debian: docker.io), docker-compose 1.29 or `docker compose`,
# debootstrap (only to make the base image once) and python3 with pip (the wheelhouse).
# Environment: FEDMM_E2E_DIR (.docker-e2e: the daemon's data root, kept as the build cache,
# and logs/), FEDMM_BASE (fedmm-base:bookworm, made by docker/base-image.sh when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
E2E_DIR=${FEDMM_E2E_DIR:-$ROOT/.docker-e2e}
LOGS=$E2E_DIR/logs
RUNTIME=$(mktemp -d /tmp/fedmm-e2e.XXXXXX)  # socket + exec root (short paths), certs, data
SITES=(site-1 site-2 site-3)
START_TIMEOUT=300  # SuperLink ready and 3 sites online (2 busy cores)
export FEDMM_BASE=${FEDMM_BASE:-fedmm-base:bookworm}
export FEDMM_CERTS=$RUNTIME/certs FEDMM_DATA=$RUNTIME/data
export DOCKER_HOST=unix://$RUNTIME/docker.sock DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1

# The daemon's own client first: BuildKit (RUN --mount) without needing a buildx plugin.
dockerd_bin=$(command -v dockerd) || { echo "[e2e] dockerd not found (apt-get install docker.io)"; exit 1; }
[[ -x $(dirname "$dockerd_bin")/../bin/docker ]] && PATH="$(cd "$(dirname "$dockerd_bin")/../bin" && pwd):$PATH"
if command -v docker-compose >/dev/null; then COMPOSE_BIN=(docker-compose); else COMPOSE_BIN=(docker compose); fi
COMPOSE=("${COMPOSE_BIN[@]}" -p fedmm-e2e -f "$ROOT/docker/compose.yml" -f "$ROOT/docker/compose.host.yml")

t0=$SECONDS
phase() { echo; echo "[e2e] $(date +%T) +$((SECONDS - t0))s: $*"; }
elapsed() { echo "$((SECONDS - $1))s"; }
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.json

dockerd_pid=
cleanup() {
    local code=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $dockerd_pid ]]; then
        phase "teardown"
        if ((code != 0)); then
            for s in superlink "${SITES[@]}"; do
                "${COMPOSE[@]}" logs --no-color "$s" >"$LOGS/$s.log" 2>&1
                echo "--- $s (last lines; all in $LOGS/$s.log)"; tail -15 "$LOGS/$s.log"
            done
        fi
        "${COMPOSE[@]}" --profile train down --volumes --remove-orphans >/dev/null 2>&1
        echo "[e2e] containers left: $(docker ps -aq | wc -l)"
        kill -TERM "$dockerd_pid" 2>/dev/null
        for _ in $(seq 120); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$dockerd_pid" 2>/dev/null && { echo "[e2e] dockerd $dockerd_pid: SIGKILL"; kill -KILL "$dockerd_pid"; }
        # what this run started: dockerd, containerd and shims all name its runtime folder;
        # dockerd leaves the host network namespace's bind mount (exec/netns/default) behind
        findmnt -rn -o TARGET | grep -F "$RUNTIME/" | sort -r | xargs -r umount
        left=$(ps -eo pid=,args= | grep -F "$RUNTIME" | grep -v grep || true)
        mounts=$(findmnt -rn -o TARGET | grep -F -e "$RUNTIME" -e "$E2E_DIR" || true)
        echo "[e2e] dockerd $dockerd_pid: $(kill -0 "$dockerd_pid" 2>/dev/null && echo running || echo stopped);" \
             "processes of this run left: ${left:-none}; mounts left: ${mounts:-none}"
    fi
    rm -rf "$RUNTIME"
    ((code == 0)) && echo "[e2e] PASSED in $((SECONDS - t0))s" || echo "[e2e] FAILED (exit $code)"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { echo "[e2e] FAIL: $*" >&2; exit 1; }

phase "wheelhouse (docker/wheelhouse.sh)"
t=$SECONDS; "$ROOT/docker/wheelhouse.sh"; timing=("wheelhouse $(elapsed $t)")

phase "dockerd: --bridge=none --iptables=false, data root $E2E_DIR/docker"
# its own session: a Ctrl-C reaches this script (which tears down in order), not the daemon
setsid "$dockerd_bin" --bridge=none --iptables=false --data-root "$E2E_DIR/docker" \
    --exec-root "$RUNTIME/exec" --pidfile "$RUNTIME/dockerd.pid" -H "$DOCKER_HOST" \
    >"$LOGS/dockerd.log" 2>&1 </dev/null &
dockerd_pid=$!
for _ in $(seq 120); do docker version >/dev/null 2>&1 && break; sleep 0.5
    kill -0 "$dockerd_pid" 2>/dev/null || { tail -5 "$LOGS/dockerd.log"; dockerd_pid=; fail "dockerd exited"; }
done
docker version --format '[e2e] engine {{.Server.Version}}, client {{.Client.Version}}' \
    || fail "dockerd not answering on $DOCKER_HOST (log: $LOGS/dockerd.log)"
dockerd_pid=$(cat "$RUNTIME/dockerd.pid")
docker info --format '[e2e] storage driver {{.Driver}}'

if ! docker image inspect "$FEDMM_BASE" >/dev/null 2>&1; then
    [[ $FEDMM_BASE == fedmm-base:bookworm ]] || fail "base image $FEDMM_BASE not in this daemon"
    phase "base image (docker/base-image.sh)"
    t=$SECONDS; IMAGE=$FEDMM_BASE "$ROOT/docker/base-image.sh"; timing+=("base image $(elapsed $t)")
fi

phase "build: server and site images on $FEDMM_BASE, network none"
t=$SECONDS
"${COMPOSE[@]}" build >"$LOGS/build.log" 2>&1 || { tail -30 "$LOGS/build.log"; fail "build"; }
timing+=("build $(elapsed $t)")
docker image ls --format '[e2e] image {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'fedmm-(server|site|base)'
docker run --rm --network none --entrypoint python fedmm-site -c \
    'import torch, torchvision; print(f"[e2e] torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}")'

phase "certificates (fedmm certs) and demo data, in containers"
docker run --rm --network none -v "$RUNTIME:/out" fedmm-server certs --out /out/certs \
    --server-host superlink $(printf -- '--site %s ' "${SITES[@]}")
docker run --rm --network none -v "$RUNTIME:/out" --entrypoint python fedmm-server \
    -m common.demo_data --out /out/data --train 300 --test 100 --sites 3 >/dev/null
ls "$FEDMM_DATA"/site-{1,2,3}.csv "$FEDMM_DATA"/test.csv >/dev/null

read -r FEDMM_PORT FEDMM_SITE_PORT_1 FEDMM_SITE_PORT_2 FEDMM_SITE_PORT_3 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export FEDMM_PORT FEDMM_SITE_PORT_1 FEDMM_SITE_PORT_2 FEDMM_SITE_PORT_3

phase "federation up: SuperLink on 127.0.0.1:$FEDMM_PORT, sites' runtime APIs on" \
      "$FEDMM_SITE_PORT_1 $FEDMM_SITE_PORT_2 $FEDMM_SITE_PORT_3"
t=$SECONDS
"${COMPOSE[@]}" up -d --no-build superlink "${SITES[@]}"
online() {
    "${COMPOSE[@]}" exec -T -e FLWR_HOME=/state/flwr-home superlink \
        flwr supernode ls fedmm --format json 2>/dev/null | python3 -c '
import json, sys
text = sys.stdin.read()
try:
    print(sum(n["status"] == "online" for n in json.loads(text[text.index("{"):])["nodes"]))
except (ValueError, KeyError):
    print(0)'
}
deadline=$((SECONDS + START_TIMEOUT))
until [[ $("${COMPOSE[@]}" logs --no-color superlink 2>&1) == *"SuperLink ready"* ]]; do
    ((SECONDS < deadline)) || fail "SuperLink not ready within ${START_TIMEOUT}s"; sleep 1
done
until [[ $(online) == 3 ]]; do
    ((SECONDS < deadline)) || fail "3 sites not online within ${START_TIMEOUT}s"; sleep 2
done
timing+=("federation up $(elapsed $t)")
echo "[e2e] SuperLink ready, 3 sites online"

phase "checks: networks, listening sockets, keys"
echo "[e2e] networks: $(docker network ls --format '{{.Name}}/{{.Driver}}' | sort | tr '\n' ' ')"
! docker network ls --format '{{.Driver}}' | grep -q bridge || fail "a bridge network exists"
pids=$(for c in $("${COMPOSE[@]}" ps -q); do docker top "$c" -eo pid | tail -n +2; done | tr '\n' ' ')
listening=$(ss -Hltnp | grep -E "pid=($(echo $pids | tr ' ' '|'))," | awk '{print $4}' | sort -u)
echo "[e2e] sockets the containers listen on: $(echo $listening | tr '\n' ' ')"
[[ -n $listening ]] || fail "no listening socket found for the containers"
! grep -vq '^127\.0\.0\.1:' <<<"$listening" || fail "a container listens beyond 127.0.0.1"
for port in $FEDMM_PORT $FEDMM_SITE_PORT_1 $FEDMM_SITE_PORT_2 $FEDMM_SITE_PORT_3; do
    grep -qx "127.0.0.1:$port" <<<"$listening" || fail "nothing listens on 127.0.0.1:$port"
done
keys_in() { "${COMPOSE[@]}" exec -T "$1" sh -c \
    'find /run/secrets /certs -name "*.key" -o -name "site-key" 2>/dev/null | sort | xargs -r sha256sum'; }
server_keys=$(keys_in superlink)
[[ $(awk '{print $2}' <<<"$server_keys") == /certs/server.key ]] || fail "server holds: $server_keys"
for s in "${SITES[@]}"; do
    got=$(keys_in "$s")
    [[ $(wc -l <<<"$got") == 1 && $got == "$(sha256sum <"$FEDMM_CERTS/sites/$s.key" | cut -d' ' -f1)  /run/secrets/site-key" ]] \
        || fail "$s holds: $got"
done
echo "[e2e] private keys: server.key in the server only, each site's key in its own container only"

phase "train: 2 rounds over TLS + node authentication (fedmm train in a container)"
t=$SECONDS
"${COMPOSE[@]}" run --rm -T train strategy.rounds=2 train.epochs=1 device=cpu \
    >"$LOGS/train.log" 2>&1 || { tail -40 "$LOGS/train.log"; fail "fedmm train"; }
timing+=("train $(elapsed $t)")
grep -E "test acc" "$LOGS/train.log" | tail -n 2 || true

phase "the saved adapter on a fresh backbone (fedmm evaluate: PeftModel.from_pretrained)"
"${COMPOSE[@]}" run --rm -T --no-deps --entrypoint fedmm train evaluate \
    --adapter /runs/demo/adapter --data /data/test.csv --device cpu \
    --out /runs/demo/reproduced.json >"$LOGS/evaluate.log" 2>&1 \
    || { tail -20 "$LOGS/evaluate.log"; fail "fedmm evaluate"; }
for f in summary.json reproduced.json; do
    "${COMPOSE[@]}" run --rm -T --no-deps --entrypoint cat train "/runs/demo/$f" >"$LOGS/$f" 2>/dev/null
done
python3 - "$LOGS/summary.json" "$LOGS/reproduced.json" <<'EOF' || fail "accuracy not reproduced"
import json, sys
summary, reproduced = (json.load(open(p)) for p in sys.argv[1:])
print(f"[e2e] run: {summary['rounds']} rounds, {summary['num_clients']} sites, "
      f"{summary['rejected_updates']} rejected updates, wall time {summary['wall_time_s']}s")
print(f"[e2e] server test_accuracy {summary['test_accuracy']!r} (loss {summary['test_loss']!r}), "
      f"reproduced from the adapter {reproduced['accuracy']!r} (loss {reproduced['loss']!r})")
sys.exit(summary["rounds"] != 2 or summary["test_accuracy"] != reproduced["accuracy"])
EOF
timing+=("total $((SECONDS - t0))s")
echo "[e2e] times: $(IFS=,; echo "${timing[*]}" | sed 's/,/, /g')"
