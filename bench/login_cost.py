#!/usr/bin/env python3
"""CPU the relay spends per sign-in: N connections, each EHLO, AUTH PLAIN,
QUIT, against the release binary, with the verified-credentials cache off
(server.auth_cache_ttl = 0: argon2 for every sign-in) and on (the default),
and the same connections without AUTH for the session's own cost.
CPU time is the relay's utime + stime from /proc/PID/stat, before and after.
Loopback only; every socket wait has a timeout."""

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

USER, PASSWORD = "invoices", "local-secret"
TIMEOUT = 10


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat, 12th and 13th after ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_relay(binary, directory, ttl):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDBRIDGE_")}
    env.update({
        "SENDBRIDGE_SERVER__LISTEN": "127.0.0.1:0",
        "SENDBRIDGE_SERVER__AUTH_CACHE_TTL": ttl,
        "SENDBRIDGE_ADMIN__LISTEN": "",
        "SENDBRIDGE_LOG__FORMAT": "json",
        "SENDBRIDGE_SPOOL__DIR": os.path.join(directory, "spool"),
        # Never contacted: the sessions send no mail.
        "SENDBRIDGE_ACCOUNTS__GMAIL__HOST": "localhost",
        "SENDBRIDGE_ACCOUNTS__GMAIL__PORT": "9",
        "SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME": "me@gmail.com",
        "SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD": "unused",
        f"SENDBRIDGE_USERS__{USER.upper()}__PASSWORD": PASSWORD,
    })
    relay = subprocess.Popen([binary, "run"], cwd=directory, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    listening = []
    ready = threading.Event()

    def drain():  # also keeps the pipe from filling up
        for line in relay.stderr:
            if not ready.is_set() and "accepting connections" in line:
                listening.append(json.loads(line)["listen"])
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(30):
        relay.kill()
        raise SystemExit("the relay did not start within 30 s")
    host, port = listening[0].rsplit(":", 1)
    return relay, (host, int(port))


def session(address, auth):
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        replies = sock.makefile("rb")

        def expect(code):
            while True:
                line = replies.readline()
                if not line.startswith(code.encode()):
                    raise RuntimeError(f"expected {code}, got {line!r}")
                if line[3:4] != b"-":
                    return

        expect("220")
        sock.sendall(b"EHLO bench\r\n")
        expect("250")
        if auth:
            plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
            sock.sendall(f"AUTH PLAIN {plain}\r\n".encode())
            expect("235")
        sock.sendall(b"QUIT\r\n")
        expect("221")


def measure(binary, ttl, auth, logins, concurrency):
    with tempfile.TemporaryDirectory() as directory:
        relay, address = start_relay(binary, directory, ttl)
        try:
            session(address, auth=False)  # warm-up, no sign-in
            cpu, started = cpu_seconds(relay.pid), time.monotonic()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(lambda _: session(address, auth), range(logins)))
            wall = time.monotonic() - started
            cpu = cpu_seconds(relay.pid) - cpu
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
    return cpu, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", default="target/release/sendbridge")
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.logins} connections, {args.concurrency} at a time, each EHLO + AUTH PLAIN + QUIT")
    runs = [
        ("cache off (auth_cache_ttl = 0)", "0", True),
        ("cache on (auth_cache_ttl = 1h)", "1h", True),
        ("no AUTH (the session's own cost)", "1h", False),
    ]
    for label, ttl, auth in runs:
        cpu, wall = measure(os.path.abspath(args.binary), ttl, auth, args.logins, args.concurrency)
        print(f"{label:34} relay CPU {cpu * 1000:8.0f} ms = {cpu * 1e6 / args.logins:8.0f} µs per connection;"
              f" {args.logins / wall:7.0f} connections/s")


if __name__ == "__main__":
    main()
