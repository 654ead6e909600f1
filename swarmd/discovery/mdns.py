"""mDNS on the LAN (python-zeroconf): announce this daemon's peer plane, and hand every
swarmd found to membership as a bootstrap contact.

Service type `_swarmd._tcp.local.`; the instance name is derived from the node id (Z85 has
characters DNS labels may not); TXT carries `id` (node id, so the first connection is
already authenticated), `port`, `model` and `proto`. Only the configured interfaces are used: tests
bind loopback and never multicast on the machine's real network."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
from collections.abc import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from libswarm.protocol import PROTOCOL_VERSION
from swarmd.identity import is_key

log = logging.getLogger("swarmd.mdns")

SERVICE_TYPE = "_swarmd._tcp.local."
RESOLVE_TIMEOUT_MS = 2000


class Mdns:
    def __init__(self, interfaces: tuple[str, ...] | str, node_id: str, model_id: str,
                 on_found: Callable[[str, str | None, str | None], None]):
        self.interfaces, self.node_id, self.model_id = interfaces, node_id, model_id
        self.on_found = on_found  # (tcp address, node id, model id)
        self.zc: Zeroconf | None = None
        self.info: ServiceInfo | None = None
        self.browser: ServiceBrowser | None = None

    def start(self) -> None:
        """Browse for other daemons (from the start, so that placement sees the swarm)."""
        if self.interfaces == "all":
            self.zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        else:
            v6 = any(":" in a for a in self.interfaces)
            self.zc = Zeroconf(interfaces=list(self.interfaces),
                               ip_version=IPVersion.All if v6 else IPVersion.V4Only)
        self.browser = ServiceBrowser(self.zc, SERVICE_TYPE, handlers=[self._on_change])

    def announce(self, host: str, port: int) -> None:
        """Register this daemon's peer plane (once it is bound)."""
        assert self.zc is not None
        addresses = self._addresses(host)
        name = f"swarmd-{hashlib.sha256(self.node_id.encode()).hexdigest()[:16]}.{SERVICE_TYPE}"
        self.info = ServiceInfo(
            SERVICE_TYPE, name, port=port, addresses=[ipaddress.ip_address(a).packed for a in addresses],
            properties={"id": self.node_id, "port": str(port), "model": self.model_id,
                        "proto": PROTOCOL_VERSION},
            server=f"swarmd-{hashlib.sha256(self.node_id.encode()).hexdigest()[:16]}.local.",
        )
        self.zc.register_service(self.info, allow_name_change=True)
        log.info("mDNS: announcing %s port %d on %s", ", ".join(addresses), port,
                 "all interfaces" if self.interfaces == "all" else ", ".join(self.interfaces))

    def _addresses(self, host: str) -> list[str]:
        if host not in ("0.0.0.0", "*", "::"):
            try:
                return [str(ipaddress.ip_address(host))]
            except ValueError:
                return [socket.gethostbyname(host)]
        if self.interfaces != "all":
            return list(self.interfaces)
        from zeroconf import get_all_addresses  # every IPv4 address of this machine

        return [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        info = zeroconf.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None or not info.port:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()}
        node_id = props.get("id")
        if node_id == self.node_id:
            return
        if not is_key(node_id):
            log.info("mDNS: %s carries no valid node id; ignored", name)
            return
        for a in info.parsed_addresses():
            self.on_found(f"tcp://{a}:{info.port}" if ":" not in a else f"tcp://[{a}]:{info.port}", node_id,
                          props.get("model"))

    def stop(self) -> None:
        if self.zc is None:
            return
        try:
            if self.browser is not None:
                self.browser.cancel()
            if self.info is not None:
                self.zc.unregister_service(self.info)
        finally:
            self.zc.close()
            self.zc = None
