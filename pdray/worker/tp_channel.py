"""The command connection between a tensor-parallel engine's rank 0 and one follower rank.

A TCP socket carrying length-prefixed pickles. Every wait has a deadline except a follower's wait
for its next command, which ends when rank 0's end closes (its process exiting closes it, however
it exits). `peer_closed` peeks without consuming, so a watchdog thread can check the connection
while another thread blocks in a collective.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import time

_HEADER = struct.Struct("!Q")
SEND_TIMEOUT_S = 60.0  # a command waits this long for room in the peer's socket buffer


class PeerGone(ConnectionError):
    """The other end of the connection closed."""


class Channel:
    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer  # named in errors: "tensor-parallel rank 1"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, address: tuple[str, int], peer: str, timeout_s: float) -> Channel:
        return cls(socket.create_connection(address, timeout=timeout_s), peer)

    def send(self, message, timeout_s: float = SEND_TIMEOUT_S) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.sendall(_HEADER.pack(len(data)) + data)
        except TimeoutError:
            raise TimeoutError(f"{self.peer} took no message for {timeout_s:.0f} s") from None
        except OSError as e:
            raise PeerGone(f"{self.peer} closed the connection ({e})") from e

    def readable(self, timeout_s: float) -> bool:
        return bool(select.select([self.sock], [], [], max(timeout_s, 0.0))[0])

    def recv(self, timeout_s: float | None):
        """The next message; None for timeout_s waits until one comes or the peer closes."""
        if timeout_s is not None and not self.readable(timeout_s):
            raise TimeoutError(f"{self.peer} sent nothing within {timeout_s:.0f} s")
        self.sock.settimeout(None if timeout_s is None else max(timeout_s, SEND_TIMEOUT_S))
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        return pickle.loads(self._read(size))

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            try:
                chunk = self.sock.recv(min(left, 1 << 20))
            except OSError as e:
                raise PeerGone(f"{self.peer} closed the connection ({e})") from e
            if not chunk:
                raise PeerGone(f"{self.peer} closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def peer_closed(self) -> bool:
        """Whether the other end has closed (reads nothing; safe beside a blocked reader)."""
        try:
            if not self.readable(0):
                return False
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def accept(server: socket.socket, timeout_s: float) -> socket.socket | None:
    """One connection from the listening socket, or None after timeout_s."""
    if not select.select([server], [], [], timeout_s)[0]:
        return None
    sock, _ = server.accept()
    return sock


def wait_until(check, timeout_s: float, interval_s: float = 0.05):
    """Call `check` until it returns something true (returned) or timeout_s passes (None)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval_s)
