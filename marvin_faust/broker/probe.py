"""A Kafka protocol probe: ask a broker for cluster metadata over a plain socket."""

from __future__ import annotations

import socket
import struct


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Ask ``host:port`` for cluster metadata; its brokers as ``(node_id, host, port)``.

    Speaks the Kafka protocol directly: ApiVersions v0 (which every broker answers), then a
    Metadata request for no topics in a version both sides know (4 to 8).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        body = _request(sock, api_key=18, version=0, correlation_id=1, body=b"")
        error, count = struct.unpack_from(">hi", body)
        if error:
            raise ValueError(f"ApiVersions error {error}")
        versions = {}
        for index in range(count):
            key, low, high = struct.unpack_from(">hhh", body, 6 + 6 * index)
            versions[key] = (low, high)
        low, high = versions.get(3, (0, -1))
        version = min(high, 8)
        if version < max(low, 4):
            raise ValueError(f"no common Metadata version (broker has {low}-{high})")
        request = struct.pack(">ib", 0, 0)  # no topics; do not create any
        if version >= 8:
            request += struct.pack(">bb", 0, 0)  # no authorized operations
        body = _request(sock, api_key=3, version=version, correlation_id=2, body=request)
    offset = 4  # throttle_time_ms
    (count,) = struct.unpack_from(">i", body, offset)
    offset += 4
    brokers = []
    for _ in range(count):
        node_id, length = struct.unpack_from(">ih", body, offset)
        offset += 6
        broker_host = body[offset : offset + length].decode()
        offset += length
        broker_port, rack_length = struct.unpack_from(">ih", body, offset)
        offset += 6 + max(rack_length, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


def _request(sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes):
    client_id = b"marvin-faust-broker"
    message = (
        struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id + body
    )
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    (answered,) = struct.unpack_from(">i", response)
    if answered != correlation_id:
        raise ValueError(f"answer to request {answered}, expected {correlation_id}")
    return response[4:]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)
