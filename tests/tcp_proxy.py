#!/usr/bin/env python3
"""A TCP proxy for the link tests: forwards 127.0.0.1:LISTEN to 127.0.0.1:TARGET.

The mode is read from CONTROL_FILE about every 50 ms:
  pass   forward bytes both ways
  close  close every open connection at once and close new ones as they arrive
  stall  keep connections open but forward nothing (a black hole), new ones too
Counts of connections and bytes go to stderr when the mode changes.
"""
import selectors
import socket
import sys
import time


def main():
    listen_port, target_port, control = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(64)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ, None)
    peers = {}  # socket -> its partner
    mode, last_read, conns, forwarded = "pass", 0.0, 0, 0

    def drop(s):
        for x in (s, peers.get(s)):
            if x is None:
                continue
            peers.pop(x, None)
            try:
                sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    while True:
        now = time.monotonic()
        if now - last_read > 0.05:
            last_read = now
            try:
                with open(control) as f:
                    m = f.read().strip() or mode
            except OSError:
                m = mode
            if m != mode:
                print(f"proxy: {mode} -> {m} ({conns} connections, {forwarded} bytes so far)",
                      file=sys.stderr, flush=True)
                mode = m
                if mode == "close":
                    for s in list(peers):
                        drop(s)
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            if s is srv:
                try:
                    client, _ = srv.accept()
                except OSError:
                    continue
                if mode == "close":
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", target_port), 2)
                except OSError:
                    client.close()
                    continue
                conns += 1
                for x in (client, upstream):
                    x.setblocking(False)
                    sel.register(x, selectors.EVENT_READ, None)
                peers[client], peers[upstream] = upstream, client
                continue
            if mode == "stall" or s not in peers:
                continue
            try:
                data = s.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(s)
                continue
            if not data:
                drop(s)
                continue
            try:
                peers[s].setblocking(True)
                peers[s].sendall(data)
                peers[s].setblocking(False)
                forwarded += len(data)
            except OSError:
                drop(s)
        if mode == "stall":
            time.sleep(0.05)


if __name__ == "__main__":
    main()
