"""Flows: the transport path a message arrived on or must leave by (RFC 5626 §3 "flow").

A flow is the edge's view of a peer: the transport, the peer's address as seen on the socket (after NAT:
RFC 3581), and for connection-oriented transports the connection it came over. Sending "over the flow a
user registered on" means sending to exactly this address, over exactly this connection when it is still
open.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Transports the edge listens on.
TRANSPORTS = ("UDP", "TCP")


@dataclass(frozen=True, slots=True)
class Flow:
    """Transport, remote (host, port) and, for TCP, the id of the connection (None: open one)."""

    transport: str
    host: str
    port: int
    conn_id: int | None = None

    @property
    def remote(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def reliable(self) -> bool:
        """RFC 3261 §17: reliable transports skip retransmission timers."""
        return self.transport != "UDP"

    def to_dict(self) -> dict[str, object]:
        return {"transport": self.transport, "host": self.host, "port": self.port}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Flow:
        port = data["port"]
        assert isinstance(port, int)
        return cls(str(data["transport"]), str(data["host"]), port, None)

    def __str__(self) -> str:
        conn = f"#{self.conn_id}" if self.conn_id is not None else ""
        return f"{self.transport.lower()}:{self.host}:{self.port}{conn}"
