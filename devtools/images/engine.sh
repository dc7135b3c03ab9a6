#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's (docker.io) when it is absent and
# start dockerd when it is not running. Idempotent; prints the engine's version.
#
# dockerd runs without its own firewall rules and without the default bridge
# (--iptables=false --bridge=none): otherwise it sets the FORWARD policy to DROP, which
# silently cuts the dev cluster's pod bridge. Builds use the host's network instead
# (docker build --network host), and nothing here needs a container on a Docker network.
set -euo pipefail

LOG="${FEDTUNE_DOCKERD_LOG:-/var/log/fedtune-dockerd.log}"

server_version() { docker version --format '{{.Server.Version}}' 2>/dev/null; }

if server_version >/dev/null; then
    server_version
    exit 0
fi
if ! command -v dockerd >/dev/null; then
    echo "installing Debian's Docker engine (docker.io)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
echo "starting dockerd (log: $LOG)" >&2
setsid nohup dockerd --iptables=false --ip-masq=false --bridge=none >>"$LOG" 2>&1 </dev/null &
for _ in $(seq 1 120); do
    if server_version; then exit 0; fi
    sleep 0.5
done
echo "dockerd did not answer within 60 s; last lines of $LOG:" >&2
tail -20 "$LOG" >&2
exit 1
