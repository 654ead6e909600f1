#!/usr/bin/env python3
"""What one large message costs between two daemons' sockets: CURVE against plain TCP, by
message size and ZeroMQ I/O threads, side by side in one run (loopback, this process).

    python tools/bench_transport.py [--sizes-mib 0.0625,1,4,16,32] [--rounds 5]

A DEALER sends one message of the size (a tensor's bytes in one frame, as a hop's hidden
states) to a ROUTER, which answers with 8 bytes; the median round trip gives MiB/s. With
--parallel N, the message is cut into N parts sent over N connections at once (what chunking
a prefill hop across connections would gain: CURVE encrypts each connection in one I/O
thread). The "frames" rows send the message as a multipart message of frames of that size,
as daemons speaking protocol 1.4 do with tensors over 1 MiB (CURVE encrypts frame by frame)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from swarmd.identity import NodeIdentity  # noqa: E402


def echo_server(ctx: zmq.Context, curve: NodeIdentity | None, stop: threading.Event) -> str:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_server = True
        sock.curve_secretkey = curve.secret_key.encode()
        sock.curve_publickey = curve.public_key.encode()
    sock.bind("tcp://127.0.0.1:*")
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve():
        while not stop.is_set():
            if sock.poll(100):
                ident = sock.recv_multipart(copy=False)[0]
                sock.send_multipart([ident, b"12345678"])
        sock.close(0)
    threading.Thread(target=serve, daemon=True).start()
    return address


def client(ctx: zmq.Context, address: str, curve: NodeIdentity | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        me = NodeIdentity(os.urandom(32))
        sock.curve_secretkey = me.secret_key.encode()
        sock.curve_publickey = me.public_key.encode()
        sock.curve_serverkey = curve.public_key.encode()
    sock.connect(address)
    return sock


def round_trip_s(socks: list[zmq.Socket], payload: bytes, rounds: int, frame_bytes: int = 0) -> float:
    n = len(socks)
    part = len(payload) // n
    parts = [memoryview(payload)[i * part:(i + 1) * part if i < n - 1 else len(payload)] for i in range(n)]
    if frame_bytes:  # each part as a multipart message of frames of at most frame_bytes
        parts = [[p[i:i + frame_bytes] for i in range(0, len(p), frame_bytes)] for p in parts]  # type: ignore
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        for s, p in zip(socks, parts):
            if frame_bytes:
                s.send_multipart(p, copy=False)
            else:
                s.send(p, copy=False)
        for s in socks:
            s.recv()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="0.0625,1,4,16,32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parallel", type=int, default=2, help="connections for the cut-up row")
    a = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    server_key = NodeIdentity(os.urandom(32))
    configs = [("plain TCP, 1 I/O thread", None, 1, 1, 0), ("CURVE, 1 I/O thread", server_key, 1, 1, 0),
               ("CURVE, 1 I/O thread, 1 MiB frames", server_key, 1, 1, 2**20),
               ("CURVE, 1 I/O thread, 256 KiB frames", server_key, 1, 1, 2**18),
               ("CURVE, 2 I/O threads", server_key, 2, 1, 0),
               ("CURVE, 2 I/O threads, 1 MiB frames", server_key, 2, 1, 2**20),
               (f"CURVE, 2 I/O threads, {a.parallel} connections", server_key, 2, a.parallel, 0)]
    sizes = [float(x) for x in a.sizes_mib.split(",")]
    print(f"{'':44}" + "".join(f"{s:>10g} MiB" for s in sizes))
    for name, curve, io_threads, conns, frame_bytes in configs:
        ctx = zmq.Context(io_threads=io_threads)
        stop = threading.Event()
        address = echo_server(ctx, curve, stop)
        socks = [client(ctx, address, curve) for _ in range(conns)]
        round_trip_s(socks, b"x", 2)  # connected and warm
        row = []
        for size in sizes:
            payload = os.urandom(int(size * 2**20))
            s = round_trip_s(socks, payload, a.rounds, frame_bytes)
            row.append(f"{size / s:>9.0f}/s")
        print(f"{name:44}" + "".join(f"{r:>14}" for r in row) + "  (MiB/s)")
        for s in socks:
            s.close(0)
        stop.set()
        time.sleep(0.2)
        ctx.term()


if __name__ == "__main__":
    main()
