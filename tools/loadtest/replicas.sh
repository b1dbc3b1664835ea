#!/usr/bin/env bash
# What a replica costs around the model, and what nginx and PostgreSQL add: wrk on loopback
# (64 clients, 4 threads, 30 s each) POSTs the same photo again and again, so after the first
# every request is an answer-cache hit: photo check, hash, cache read, photo store, one database
# transaction, JSON; no inference. Three configurations in the same run on the same machine:
#   A. one replica on SQLite, direct;
#   B. one replica on PostgreSQL (a private server this script starts), direct;
#   C. three replicas on that PostgreSQL and one photo folder, behind nginx.
# Prints requests/s, latency and statuses of each, and the ratios B/A and C/B. Needs wrk, nginx
# and PostgreSQL (Debian: wrk nginx-light postgresql); the release build is made first.
#
#   tools/loadtest/replicas.sh        # DURATION=30s CONNECTIONS=64 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-30s}
CONNECTIONS=${CONNECTIONS:-64}
for tool in wrk /usr/sbin/nginx; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk nginx-light)"; exit 1; }
done
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
cargo build --release --locked -p inspector-cli >/dev/null
BIN=$PWD/target/release/inspector
WORK=$(mktemp -d)
chmod 755 "$WORK"
AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    [ -d "$WORK/pg" ] && "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
python3 - "$WORK/body.json" <<'PY'
import base64, json, sys
photo = open("crates/train/tests/fixtures/overfit/data/3.png", "rb").read()
json.dump({"image_base64": base64.b64encode(photo).decode()}, open(sys.argv[1], "w"))
PY

# PostgreSQL: a private server on port 18100, as the tests start theirs.
mkdir -p "$WORK/pgsock" "$WORK/pg"
if [ "$(id -u)" = 0 ]; then chown postgres: "$WORK/pgsock" "$WORK/pg"; fi
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg" -U postgres -A trust -E UTF8 --no-sync >/dev/null
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pgsock/pg.log" -w \
    -o "-p 18100 -k $WORK/pgsock -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
"${AS_PG[@]}" "$PG_BIN/createdb" -h "$WORK/pgsock" -p 18100 -U postgres bench
PG_URL=postgres://postgres@127.0.0.1:18100/bench

serve() { # PORT DB DATA_DIR
    "$BIN" serve --model crates/qwen2vl/tests/fixtures/tiny-a \
        --adapter crates/train/tests/fixtures/overfit/adapter \
        --addr "127.0.0.1:$1" --db "$2" --data-dir "$3" --trusted-proxy 127.0.0.1 \
        --rate-limit 0 --max-new-tokens 160 --queue 64 2>"$WORK/server-$1.log" &
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return
        sleep 0.1
    done
    echo "the server on port $1 did not start"; cat "$WORK/server-$1.log"; exit 1
}

declare -A RPS
measure() { # NAME URL
    # The first request fills the answer cache; the rest are hits.
    curl -sf -H 'Content-Type: application/json' --data-binary @"$WORK/body.json" "$2/api/v1/inspections" >/dev/null
    OUT=$(BODY_FILE="$WORK/body.json" wrk -t4 -c"$CONNECTIONS" -d"$DURATION" --timeout 60s --latency \
        -s tools/loadtest/post.lua "$2/api/v1/inspections")
    RPS[$1]=$(echo "$OUT" | awk '/Requests\/sec/ {print $2}')
    echo "== $1: $CONNECTIONS clients, $DURATION"
    echo "$OUT" | grep -E 'Requests/sec|statuses|errors:|p50_ms|requests in'
}

serve 18111 "$WORK/a.db" "$WORK/data-a"
measure "A (one replica, SQLite)" http://127.0.0.1:18111
kill -TERM %1 && wait %1 || true

serve 18121 "$PG_URL" "$WORK/shared"
measure "B (one replica, PostgreSQL)" http://127.0.0.1:18121
kill -TERM %1 && wait %1 || true

for p in 18131 18132 18133; do serve $p "$PG_URL" "$WORK/shared"; done
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx.conf" <<CONF
$([ "$(id -u)" = 0 ] && echo "user root;")
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/logs/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body; proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi; uwsgi_temp_path $WORK/nginx/uwsgi; scgi_temp_path $WORK/nginx/scgi;
    client_max_body_size 48m;
    upstream inspector {
        server 127.0.0.1:18131 max_fails=1 fail_timeout=30s;
        server 127.0.0.1:18132 max_fails=1 fail_timeout=30s;
        server 127.0.0.1:18133 max_fails=1 fail_timeout=30s;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:18130;
        location / {
            proxy_pass http://inspector;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout;
        }
    }
}
CONF
/usr/sbin/nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/logs/error.log"
sleep 0.5
measure "C (three replicas, PostgreSQL, nginx)" http://127.0.0.1:18130
python3 - "${RPS["A (one replica, SQLite)"]}" "${RPS["B (one replica, PostgreSQL)"]}" \
    "${RPS["C (three replicas, PostgreSQL, nginx)"]}" <<'PY'
import sys
a, b, c = map(float, sys.argv[1:])
print(f"ratio B/A (PostgreSQL over SQLite, one replica): {b / a:.2f}")
print(f"ratio C/B (three replicas behind nginx over one, same cores): {c / b:.2f}")
PY
