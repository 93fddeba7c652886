"""Client addresses behind reverse proxies: ``X-Forwarded-For`` or ``Forwarded`` (RFC 7239).

Forwarding headers are only believed when the peer that sent them is a trusted proxy, and then
only as far as the chain stays trusted: the chain is walked from the right (the hop nearest to
us), trusted proxies are skipped, and the first untrusted hop is the client. Anything malformed
(garbage, obfuscated identifiers, ``unknown``) ends the walk with the peer address, so a spoofed
or broken header never names an arbitrary client. Python's ``ipaddress`` does the parsing; what
is written here is only the walk, which no well-kept library offers on its own for ASGI (uvicorn's
``ProxyHeadersMiddleware`` rewrites ``scope["client"]`` for the whole app and ignores
``Forwarded``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Literal

from .context import RequestContext
from .types import Scope

__all__ = ["TrustedProxies", "parse_address"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAX_HOPS = 32  # hops examined from the right
_MAX_HEADER_BYTES = 8192
_CUT = "(cut)"  # stands for the part of an oversized header that was not read


class TrustedProxies:
    """Which peers may speak for the client, and how to find the client through them.

    Only one header is read, the one your proxies write (``header``): a proxy that appends the
    client to ``X-Forwarded-For`` usually passes a client's own ``Forwarded`` through untouched,
    so believing whichever is present would let clients choose their address.

    Args:
        proxies: IP addresses and CIDR networks (``"10.0.0.0/8"``, ``"::1"``) of the proxies
            in front of the service, and ``"unix"`` for a peer on a unix socket (nginx in
            front of ``uvicorn --uds``: servers report such a peer without an address). Empty:
            forwarding headers are ignored.
        header: ``"x-forwarded-for"`` (nginx, HAProxy, cloud load balancers) or
            ``"forwarded"`` (RFC 7239).

    Raises:
        ValueError: an entry is not an address or network, or ``header`` is neither.
    """

    def __init__(
        self,
        proxies: Iterable[str] = (),
        *,
        header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for",
    ) -> None:
        if isinstance(proxies, str):
            raise ValueError(f"trusted_proxies must be a list, e.g. [{proxies!r}], not a string")
        if header not in ("x-forwarded-for", "forwarded"):
            raise ValueError(f"header must be 'x-forwarded-for' or 'forwarded', got {header!r}")
        self.header = header.encode()
        networks: list[IPNetwork] = []
        self.unix = False
        for proxy in proxies:
            if proxy.strip().lower() == "unix":
                self.unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    "trusted_proxies entries must be IP addresses, CIDR networks or 'unix', "
                    f"got {proxy!r}"
                ) from None
        self.networks: tuple[IPNetwork, ...] = tuple(networks)

    @classmethod
    def of(cls, proxies: Iterable[str] | TrustedProxies) -> TrustedProxies:
        """``proxies`` as given if already a ``TrustedProxies``, else made from the list (the
        ``trusted_proxies`` option of the middlewares takes either)."""
        return proxies if isinstance(proxies, TrustedProxies) else cls(proxies)

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def apply(self, context: RequestContext, scope: Scope) -> str | None:
        """Resolve the client address into ``context.client`` (once per request) and return it."""
        if not context.client_resolved:
            context.client = self.client(scope)
            context.client_resolved = True
        return context.client

    def client(self, scope: Scope) -> str | None:
        """The client address of ``scope``: the peer, or the first untrusted forwarded hop."""
        peer_info = scope.get("client")
        peer: str | None = str(peer_info[0]) if peer_info and peer_info[0] else None
        if peer is None:
            if not self.unix:  # no address: a unix socket peer (or a server that says nothing)
                return None
        elif not self.networks:
            return peer
        else:
            peer_address = parse_address(peer)
            if peer_address is not None:
                peer = str(peer_address)  # ::ffff:10.0.0.1 is 10.0.0.1, trusted or not
            if peer_address is None or not self.is_trusted(peer_address):
                return peer
        hops = _forwarded_hops(scope["headers"], self.header)
        if not hops:
            return peer
        for hop in reversed(hops[-_MAX_HOPS:]):
            address = parse_address(hop)
            if address is None:
                return peer  # malformed: believe nothing further left
            if not self.is_trusted(address):
                return str(address)
        if len(hops) > _MAX_HOPS or hops[0] is _CUT:
            return peer  # ours as far as we looked; beyond that we did not look
        # Every hop is one of ours: the leftmost is as close to the client as we can get.
        return str(parse_address(hops[0]))


def _forwarded_hops(headers: Iterable[tuple[bytes, bytes]], header: bytes) -> Sequence[str] | None:
    """The hops named by ``header`` (repeated headers joined in order); ``None`` if absent."""
    values = [value for name, value in headers if name == header]
    if not values:
        return None
    if header == b"forwarded":
        return [_forwarded_for(element) for element in _right_end(values)]
    return [hop.strip() for hop in _right_end(values)]


def _right_end(values: list[bytes]) -> list[str]:
    """The comma-separated elements of the joined header values; of an oversized header only
    the right end (what our own proxies wrote), without the element the cut went through."""
    joined = b",".join(values)
    if len(joined) <= _MAX_HEADER_BYTES:
        return joined.decode("latin-1").split(",")
    # The element the cut went through is replaced by a mark the walk stops at.
    return [_CUT, *joined[-_MAX_HEADER_BYTES:].decode("latin-1").split(",")[1:]]


def _forwarded_for(element: str) -> str:
    """The ``for=`` node of one ``Forwarded`` element (RFC 7239 §4), or ``""``."""
    for pair in element.split(";"):
        name, _, value = pair.strip().partition("=")
        if name.strip().lower() == "for":
            return value.strip().strip('"')
    return ""


def parse_address(node: str) -> IPAddress | None:
    """An address from ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1``, ``[2001:db8::1]:80``;
    an IPv4-mapped one (``::ffff:10.0.0.1``, how a dual-stack listener reports an IPv4 peer)
    as the IPv4 address it is, so that every check of it (trusted proxy, allow list,
    loopback) judges the same address. ``None`` for anything else."""
    node = node.strip()
    if node.startswith("["):
        node = node[1:].partition("]")[0]
    elif node.count(":") == 1:
        node = node.partition(":")[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
