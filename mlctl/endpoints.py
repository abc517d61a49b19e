"""Where a worker's metrics endpoint binds and the address it advertises to scrapers, so that a
multi-node run never advertises a loopback address (:func:`endpoint_addresses`)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and any 127.0.0.0/8 or ``::1`` literal."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_addresses(bind: str, node_ip: str) -> tuple[str, str]:
    """``(address to bind, address to advertise)`` for a worker on a node whose cluster address is
    ``node_ip`` (what Ray uses for the node; ``127.0.0.1`` for an embedded single-machine Ray).

    - a wildcard bind serves on every interface and is advertised as ``node_ip``;
    - a loopback bind on a node with a non-loopback address (the node is part of a networked
      cluster) is replaced by ``node_ip``: a loopback endpoint is unreachable from every other host,
      and before this rule each node advertised the same ``127.0.0.1:port`` (duplicates a scraper
      could not tell apart). The node address is the one Ray already serves its peers on;
    - any other address is bound and advertised as given.

    So a multi-node run never advertises a loopback address.
    """
    if bind in ("", "0.0.0.0", "::"):
        return bind, node_ip
    if is_loopback(bind) and not is_loopback(node_ip):
        return node_ip, node_ip
    return bind, bind


def advertised_host(bind: str) -> str:
    """The address others should scrape: ``bind`` itself, or for a wildcard bind this machine's
    outward-facing address (no packet is sent; connecting a UDP socket only picks a route)."""
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def endpoint_info(rank: int, node: str, host: str, port: int) -> dict[str, Any]:
    """What a rank announces of its endpoint (the driver prints it and feeds Prometheus from it)."""
    shown = f"[{host}]" if ":" in host else host
    return {"rank": rank, "node": node, "host": host, "port": port, "url": f"http://{shown}:{port}/metrics"}


def write_endpoint(run_dir: Path, info: dict[str, Any]) -> None:
    """``RUN/endpoints/rankNNNNN.json``, replaced atomically (a record in the run folder)."""
    folder = Path(run_dir) / "endpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{info['rank']:05d}.json"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / f"rank{info['rank']:05d}.json")


def node_ip() -> str:
    """The address Ray uses for this node. Outside Ray (the engine driven by plain torch processes,
    as in its own tests) the run is on one machine, so loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
