#!/usr/bin/env bash
# Checks the container image without a Docker engine: builds the static
# binary, builds the Dockerfile's runtime stage from it with buildah, runs the
# relay in that image and sends a mail through it to a local SMTP sink.
#
# Needs root (network namespace, buildah), buildah (apt-get install buildah),
# python3 and iproute2. Everything runs in a private network namespace, so the
# image's own ports (2525, admin 9025) cannot clash with anything on the host.
# Usage: sudo deploy/verify-image.sh    (exit 0 only when every check passed)

# The checks are functions called through check/require, not unreachable:
# shellcheck disable=SC2317
set -euo pipefail
cd "$(dirname "$0")/.."

readonly TARGET=x86_64-unknown-linux-gnu
readonly BIN=target/$TARGET/release/sendbridge
readonly IMAGE=localhost/sendbridge-verify
readonly SINK_PORT=2587
readonly APP_PASSWORD=abcdabcdabcdabcd
readonly LOCAL_USER=invoices LOCAL_PASSWORD=old-password

for tool in cargo buildah ip python3 readelf timeout; do
    command -v "$tool" >/dev/null || { echo "verify-image: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "verify-image: run as root (network namespace, buildah)" >&2; exit 2; }

work=$(mktemp -d /tmp/sendbridge-verify.XXXXXX)
ns=sendbridge-verify-$$
relay_pid='' sink_pid='' buildah_pid=''

# A private image store and temporary directory (where `run` mounts the
# container) under $work: nothing outside it is touched.
mkdir "$work/tmp"
buildah=(env TMPDIR="$work/tmp" buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
in_ns() { ip netns exec "$ns" "$@"; }

# Processes running the image's binary: their executable lies under $work.
image_processes() {
    local proc exe
    for proc in /proc/[0-9]*; do
        exe=$(readlink "$proc/exe" 2>/dev/null) || continue
        [[ $exe == "$work/"*/usr/local/bin/sendbridge ]] && echo "${proc#/proc/}"
    done
    return 0
}

# wait_for_exit PID: waits (bounded) for any process to end.
wait_for_exit() {
    timeout 20 tail --pid="$1" -f /dev/null
}

cleanup() {
    # The relay first: killing `buildah run` does not always end it, and a
    # buildah still cleaning up would recreate its store after the rm below.
    for pid in $(image_processes) "$sink_pid"; do
        kill "$pid" 2>/dev/null || true
    done
    if [ -n "$buildah_pid" ] && ! wait_for_exit "$buildah_pid"; then
        kill "$buildah_pid" 2>/dev/null || true
        wait_for_exit "$buildah_pid" || true
    fi
    "${buildah[@]}" rm --all >/dev/null 2>&1 || true
    "${buildah[@]}" rmi --all --force >/dev/null 2>&1 || true
    ip netns delete "$ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# An interrupted run exits normally, so the cleanup above runs.
trap 'exit 130' INT TERM

results=()
failed=0
# check NAME COMMAND...: runs COMMAND and records PASS or FAIL under NAME.
check() {
    local name=$1
    shift
    echo "--- $name"
    if "$@"; then
        results+=("PASS  $name")
    else
        results+=("FAIL  $name")
        failed=1
    fi
}

# require NAME COMMAND...: a check the following ones depend on.
require() {
    check "$@"
    [[ ${results[-1]} == PASS* ]] || summary
}

# wait_for SECONDS COMMAND...: retries COMMAND every half second until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

summary() {
    echo "--- relay log"
    cat "$work/relay.log" 2>/dev/null || true
    echo
    echo "=== verify-image summary"
    printf '%s\n' "${results[@]}"
    if [ "$failed" = 0 ]; then echo "PASS: all ${#results[@]} checks"; else echo "FAIL"; fi
    exit "$failed"
}

build_binary() {
    local start=$SECONDS
    RUSTFLAGS='-C target-feature=+crt-static' timeout 3600 \
        cargo build --release --locked --target "$TARGET"
    echo "release build took $((SECONDS - start)) s"
}

is_static() {
    ! readelf -lW "$BIN" | grep -q 'program interpreter'
}

# The build context mirrors the build stage's /rootfs and /empty, so the
# runtime stage is built from the Dockerfile as written.
build_image() {
    local context=$work/context
    mkdir -p "$context"/rootfs/{usr/local/bin,etc/ssl/certs,etc/sendbridge/certs,var/spool} "$context/empty"
    cp "$BIN" "$context/rootfs/usr/local/bin/"
    cp /etc/ssl/certs/ca-certificates.crt "$context/rootfs/etc/ssl/certs/"
    sed -n '/^FROM scratch/,$p' Dockerfile | sed 's/--from=build //' >"$context/Containerfile"
    timeout 300 "${buildah[@]}" bud --quiet --format docker --isolation chroot \
        -f "$context/Containerfile" -t "$IMAGE" "$context"
}

# image_config FIELD EXPECTED: one field of the image's Docker config.
image_config() {
    local actual
    actual=$("${buildah[@]}" inspect --type image --format "{{.Docker.Config.$1}}" "$IMAGE")
    echo "$1: $actual"
    [ "$actual" = "$2" ]
}

# An SMTP server on 127.0.0.1 that takes AUTH PLAIN with the app password and
# stores each message (with the user it signed in as) under $work/received.
start_sink() {
    mkdir -p "$work/received"
    cat >"$work/sink.py" <<'EOF'
import asyncio, base64, os, sys

port, out, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
count = 0

async def session(reader, writer):
    global count
    async def reply(text):
        writer.write(text.encode() + b"\r\n")
        await writer.drain()
    user = None
    await reply("220 sink ESMTP")
    while line := await reader.readline():
        words = line.decode(errors="replace").split()
        verb = words[0].upper() if words else ""
        if verb == "EHLO":
            await reply("250-sink\r\n250 AUTH PLAIN")
        elif verb == "AUTH" and len(words) == 3:
            _, name, secret = base64.b64decode(words[2]).decode().split("\0")
            user = name if secret == password else None
            await reply("235 2.7.0 Accepted" if user else "535 5.7.8 Bad credentials")
        elif verb in ("MAIL", "RCPT") and not user:
            await reply("530 5.7.0 Authentication required")
        elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
            await reply("250 2.0.0 OK")
        elif verb == "DATA":
            await reply("354 Go ahead")
            data = b""
            while (chunk := await reader.readline()) not in (b".\r\n", b""):
                data += chunk
            count += 1
            path = os.path.join(out, f"{count}.eml")
            with open(path + ".tmp", "wb") as file:
                file.write(f"X-Sink-User: {user}\r\n".encode() + data)
            os.rename(path + ".tmp", path)
            await reply("250 2.0.0 OK stored")
        elif verb == "QUIT":
            await reply("221 2.0.0 Bye")
            break
        else:
            await reply("502 5.5.2 Not implemented")
    writer.close()

async def main():
    server = await asyncio.start_server(session, "127.0.0.1", port)
    open(os.path.join(out, "ready"), "w").close()
    await server.serve_forever()

asyncio.run(main())
EOF
    in_ns python3 "$work/sink.py" "$SINK_PORT" "$work/received" "$APP_PASSWORD" &
    sink_pid=$!
    wait_for 10 test -e "$work/received/ready"
}

# Starts the image's command (`run`) with only the account and the local
# login added, the app password as a secret file, as a sidecar would be.
start_relay() {
    echo "$APP_PASSWORD" >"$work/app-password"
    chmod 0444 "$work/app-password"
    "${buildah[@]}" from --pull=never --name sendbridge-verify "$IMAGE" >/dev/null
    in_ns timeout 300 "${buildah[@]}" run --isolation chroot \
        -v "$work/app-password:/run/secrets/app-password:ro" \
        -e SENDBRIDGE_ACCOUNTS__SINK__HOST=localhost \
        -e SENDBRIDGE_ACCOUNTS__SINK__PORT="$SINK_PORT" \
        -e SENDBRIDGE_ACCOUNTS__SINK__TLS=none \
        -e SENDBRIDGE_ACCOUNTS__SINK__USERNAME=me@example.com \
        -e SENDBRIDGE_ACCOUNTS__SINK__PASSWORD_FILE=/run/secrets/app-password \
        -e "SENDBRIDGE_USERS__${LOCAL_USER^^}__PASSWORD=$LOCAL_PASSWORD" \
        sendbridge-verify -- /usr/local/bin/sendbridge run >"$work/relay.log" 2>&1 &
    buildah_pid=$!
    wait_for 30 grep -q "accepting connections" "$work/relay.log" || return 1
    relay_pid=$(image_processes | head -n 1)
    [ -n "$relay_pid" ]
}

process_uid_is_non_root() {
    local uid
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$relay_pid/status")
    echo "relay pid $relay_pid runs as uid $uid"
    [ "$uid" = 65532 ]
}

# The generated certificate cannot go to the image's read-only
# /etc/sendbridge/certs: it must be under the spool (send_mail uses it).
cert_under_spool() {
    grep 'generated a self-signed certificate' "$work/relay.log" |
        grep -q '/var/spool/sendbridge/certs/sendbridge.crt'
}

# Sends a mail with STARTTLS and AUTH, as a legacy program would.
send_mail() {
    in_ns timeout 30 python3 - "$LOCAL_USER" "$LOCAL_PASSWORD" <<'EOF'
import smtplib, ssl, sys

with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as client:
    client.ehlo("legacy.example")
    assert client.has_extn("starttls"), "STARTTLS not offered"
    # The relay's certificate is self-signed: this checks TLS works, not trust.
    client.starttls(context=ssl._create_unverified_context())
    client.login(sys.argv[1], sys.argv[2])
    client.sendmail("billing@legacy.example", ["customer@example.com"],
                    "Subject: verify-image\r\n\r\nSent through the container.\r\n")
EOF
}

mail_arrived() {
    wait_for 20 test -e "$work/received/1.eml" &&
        grep -q '^Subject: verify-image' "$work/received/1.eml" &&
        grep -q '^X-Sink-User: me@example.com' "$work/received/1.eml"
}

health_succeeds() {
    local status=0
    in_ns timeout 20 "${buildah[@]}" run --isolation chroot sendbridge-verify -- /usr/local/bin/sendbridge health || status=$?
    echo "sendbridge health exited with $status"
    [ "$status" = 0 ]
}

stops_on_sigterm() {
    kill -TERM "$relay_pid" && wait_for_exit "$buildah_pid" &&
        grep -q 'shutting down' "$work/relay.log"
}

require "static binary builds" build_binary
check "binary is statically linked" is_static
require "runtime stage builds FROM scratch" build_image
check "image user is 65532:65532" image_config User 65532:65532
check "image health check is sendbridge health" \
    image_config Healthcheck.Test '[CMD /usr/local/bin/sendbridge health]'
check "image exposes 2525" image_config ExposedPorts 'map[2525/tcp:{}]'

ip netns add "$ns"
in_ns ip link set lo up
require "SMTP sink starts" start_sink
require "relay starts in the image" start_relay
check "relay process runs as uid 65532" process_uid_is_non_root
check "listens on 0.0.0.0:2525, logs JSON" grep -q '"listen":"0.0.0.0:2525"' "$work/relay.log"
check "self-signed certificate generated under the spool" cert_under_spool
check "mail sent with STARTTLS and AUTH" send_mail
check "mail arrives upstream, signed in with the app password file" mail_arrived
check "sendbridge health exits 0" health_succeeds
check "relay stops on SIGTERM" stops_on_sigterm
summary
