"""Who keeps a relay's slots (network.relay_max_servers) when more servers want one than fit.

Registering costs a key nothing: with slots kept by whoever came first, a few Sybil keys that
register and renew every second keep out the servers that need a relay. Instead, each
registration ranks by what it shows, and a newcomer takes the slot of one that ranks lower:

1. Vouched before not: the relay's peer table holds the key's signed record (gossiped, its
   signature checked) naming a server (it serves blocks) that does not claim to be reachable,
   which is what a server that needs a relay publishes. A key that only connects and
   registers is never vouched, so it holds a slot only while no vouched server wants it.
2. Active before idle: a registration that had a request or an answer relayed within
   ACTIVE_S, or took its slot less than ACTIVE_S ago (it has had no time to be used). A
   newcomer counts as active. So a server in use is never displaced, and one that only
   renews gives way after ACTIVE_S.

Among equals, the registration idle longest goes first, and only to a newcomer that ranks
strictly higher: otherwise the newcomer is refused (`limit`). And no network (/24, /48) holds
more than `per_network()` slots: a newcomer from a network at its share may only displace
one of that network's own. A squatter must then publish records, keep traffic flowing
through the relay (spending the byte budget it shares with everyone) and hold addresses in
several networks: the work of serving, without the serving."""

from __future__ import annotations

from dataclasses import dataclass

from libswarm.errors import LimitError

ACTIVE_S = 60.0  # a minute without a relayed message: a server in use has one every few seconds


@dataclass
class Slot:
    ident: bytes  # its connection's identity here
    renewed: float  # monotonic: its last registration (renewed every second)
    active: float  # monotonic: its last relayed message, or when it took the slot
    network: str | None  # where it connects from (prefixes.network_of); None: unknown
    vouched: bool  # a signed record of a server that needs a relay is known (see above)


def per_network(max_servers: int) -> int:
    """Slots one network may hold: a quarter, so that it takes four networks to fill a relay;
    never fewer than two (a relayed server's two links may come from one NAT)."""
    return max(2, max_servers // 4)


def rank(slot: Slot, now: float) -> tuple[bool, bool]:
    return slot.vouched, now - slot.active < ACTIVE_S


def make_room(slots: dict[str, Slot], max_servers: int, network: str | None, vouched: bool, now: float) -> str | None:
    """The key whose slot a newcomer (from `network`, `vouched` or not) takes; None when there is
    room already. LimitError, naming the limit, when every candidate ranks as high as it does."""
    same = [k for k, s in slots.items() if network is not None and s.network == network]
    if len(same) >= per_network(max_servers):
        candidates, limit = same, (f"{len(same)} of its servers come from {network}, the most one network may "
                                   f"hold (a quarter of network.relay_max_servers)")
    elif len(slots) >= max_servers:
        candidates, limit = list(slots), f"this relay serves {len(slots)} servers, its most (network.relay_max_servers)"
    else:
        return None
    victim = min(candidates, key=lambda k: (rank(slots[k], now), slots[k].active))
    if rank(slots[victim], now) >= (vouched, True):
        raise LimitError(f"{limit}; none gives way to a newcomer (each is in use, or vouched for by its record "
                         "while the newcomer is not)")
    return victim
