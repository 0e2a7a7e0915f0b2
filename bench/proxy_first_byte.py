"""Connect and first byte through an upstream proxy vs direct to the relay (issue 31's benchmark
row): for each path, N times, a fresh Dialer opens its session (TCP, the proxy's CONNECT or SOCKS5
exchange if any, WebSocket or the gRPC call, authentication), dials an echo server through the relay, sends one
byte and reads it back. Prints the median and 90th percentile of that whole sequence, and of the
session open alone. Loopback only: squid (HTTP CONNECT, Basic auth), microsocks and dante
(SOCKS5 with a password; dante only as root, its password files bind-mounted in a private mount
namespace) from Debian, the relay embedded, the libtunnel Python package from the wheel.

    python bench/proxy_first_byte.py [N]      (default N = 200; nothing here asserts a timing)
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import libtunnel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port} after 30 s")
            time.sleep(0.02)


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionResetError:
            pass  # the dialer closed its session right after the first byte


def start_squid(d: str) -> tuple[subprocess.Popen[bytes], int]:
    os.chmod(d, 0o777)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "pw"], check=True, capture_output=True, text=True).stdout.strip()
    with open(f"{d}/passwd", "w") as f:
        f.write(f"alice:{hashed}\n")
    port = free_port()
    with open(f"{d}/squid.conf", "w") as f:
        f.write(
            f"http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\naccess_log none\ncache_log {d}/cache.log\n"
            f"cache_store_log none\ncoredump_dir {d}\ncache deny all\nshutdown_lifetime 0 seconds\npinger_enable off\n"
            f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n"
            "acl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n"
        )
    exe = shutil.which("squid") or "/usr/sbin/squid"
    p = subprocess.Popen([exe, "-N", "-n", f"ltbench{os.getpid()}", "-f", f"{d}/squid.conf"], stdin=subprocess.DEVNULL)
    wait_listening(port)
    return p, port


def start_dante(d: str) -> tuple[subprocess.Popen[bytes], int] | None:
    """danted with the username method, its password files bind-mounted in a private mount
    namespace (needs root; None without it or without danted)."""
    exe = shutil.which("danted") or ("/usr/sbin/danted" if os.path.exists("/usr/sbin/danted") else None)
    if exe is None or os.geteuid() != 0:
        return None
    hashed = subprocess.run(["openssl", "passwd", "-6", "pw"], check=True, capture_output=True, text=True).stdout.strip()
    with open(f"{d}/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                "dave:x:4242:4242::/nonexistent:/usr/sbin/nologin\n")
    with open(f"{d}/shadow", "w") as f:
        f.write(f"root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\ndave:{hashed}:19000:0:99999:7:::\n")
    port = free_port()
    with open(f"{d}/danted.conf", "w") as f:
        f.write(f"logoutput: {d}/danted.log\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n"
                "clientmethod: none\nsocksmethod: username\nuser.privileged: root\nuser.unprivileged: nobody\n"
                "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n}\nsocks pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  command: connect\n}\n")
    script = f"mount --bind {d}/passwd /etc/passwd && mount --bind {d}/shadow /etc/shadow && exec {exe} -f {d}/danted.conf"
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdin=subprocess.DEVNULL)
    wait_listening(port)
    return p, port


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    key = libtunnel.keygen(1)
    relay = libtunnel.Server(
        {"listen": "127.0.0.1:0", "auth_keys": libtunnel.auth_keys(key), "allow": [{"host": "127.0.0.1", "port": echo.server_address[1]}],
         "max_handshakes_per_source": 100000},
        env=False,
    )
    d = tempfile.mkdtemp(prefix="libtunnel-bench-squid-")
    squid, squid_port = start_squid(d)
    socks_port = free_port()
    socks = subprocess.Popen(["microsocks", "-i", "127.0.0.1", "-p", str(socks_port), "-u", "bob", "-P", "pw"],
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(socks_port)
    dante_dir = tempfile.mkdtemp(prefix="libtunnel-bench-dante-")
    dante = start_dante(dante_dir)
    target = f"127.0.0.1:{echo.server_address[1]}"
    ws, grpc = relay.url, relay.url.replace("ws://", "grpc://", 1)
    squid_url = f"http://alice:pw@127.0.0.1:{squid_port}"
    paths = [
        ("direct", ws, "none"),
        ("squid (HTTP CONNECT, Basic)", ws, squid_url),
        ("microsocks (SOCKS5, password)", ws, f"socks5://bob:pw@127.0.0.1:{socks_port}"),
        ("direct, grpc://", grpc, "none"),
        ("squid, grpc://", grpc, squid_url),
    ]
    if dante is not None:
        paths.append(("dante (SOCKS5, password)", ws, f"socks5://dave:pw@127.0.0.1:{dante[1]}"))
    else:
        print("dante row left out: needs root and danted (apt-get install dante-server)")
    try:
        def measure(url: str, proxy: str, count: int) -> tuple[list[float], list[float]]:
            session, total = [], []
            for _ in range(count):
                t0 = time.perf_counter()
                with libtunnel.Dialer(url, key=key, proxy=proxy, timeout=10) as dialer:
                    dialer.connect()
                    t1 = time.perf_counter()
                    with dialer.dial(target) as s:
                        s.sendall(b"x")
                        assert s.recv(1) == b"x"
                    t2 = time.perf_counter()
                session.append((t1 - t0) * 1000)
                total.append((t2 - t0) * 1000)
            return session, total

        for _name, url, proxy in paths:  # warm-up (squid starts its auth helper on first use)
            measure(url, proxy, 3)
        rows = [(name, *measure(url, proxy, n)) for name, url, proxy in paths]
        print(f"{'path':32} {'session open ms (median / p90)':>32} {'connect + first byte ms (median / p90)':>40}")
        for name, session, total in rows:
            q = lambda xs: (statistics.median(xs), statistics.quantiles(xs, n=10)[-1])  # noqa: E731
            (sm, s9), (tm, t9) = q(session), q(total)
            print(f"{name:32} {sm:>20.2f} / {s9:<10.2f} {tm:>28.2f} / {t9:<10.2f}")
        print(f"(N = {n} fresh dialers per path, loopback, {os.cpu_count()} CPUs)")
    finally:
        squid.kill()
        socks.kill()
        if dante is not None:
            dante[0].terminate()
            dante[0].wait()
        shutil.rmtree(dante_dir, ignore_errors=True)
        squid.wait()
        for seg in os.listdir("/dev/shm"):
            if seg.startswith(f"ltbench{os.getpid()}-"):
                os.remove(f"/dev/shm/{seg}")
        shutil.rmtree(d, ignore_errors=True)
        relay.shutdown()


if __name__ == "__main__":
    main()
