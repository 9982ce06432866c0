"""Server addresses checked and turned into gRPC targets: pure functions, no I/O.

A malformed address is refused when the client is built, naming it, rather than
found by gRPC's resolver on the first call (which the client would then retry).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["resolve_target"]

# gRPC's own target schemes (grpc/doc/naming.md). Any other ``scheme://`` is a URL given by mistake.
_GRPC_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock"})
_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\[\]]*)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[^:]*))?")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_FAMILY_NAMES = {"ipv4": "IPv4", "ipv6": "IPv6"}


class _HostPort(NamedTuple):
    family: str  # "ipv4", "ipv6" or "name"
    host: str  # an IPv6 address without its brackets
    port: str | None


def _check_port(port: str) -> None:
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")


def _host_family(host: str) -> str:
    """'ipv4' or 'name' for a host that is not in brackets; ValueError when it is neither."""
    labels = host.removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        return "ipv4"
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not a host name")
    return "name"


def _host_port(address: str, *, port_required: bool = True) -> _HostPort:
    """``HOST:PORT`` or ``[IPv6]:PORT`` taken apart and checked; ValueError saying what is wrong."""
    match = _HOST_PORT.fullmatch(address)
    if match is None or (port_required and match["port"] is None):
        hint = ", an IPv6 address in brackets as in [::1]:8001" if address.count(":") > 1 else ""
        raise ValueError(f"expected HOST:PORT{hint}")
    if match["port"] is not None:
        _check_port(match["port"])
    if match["ipv6"] is None:
        return _HostPort(_host_family(match["name"]), match["name"], match["port"])
    try:
        ipaddress.IPv6Address(match["ipv6"])
    except ValueError:
        raise ValueError(f"{match['ipv6']!r} is not an IPv6 address") from None
    return _HostPort("ipv6", match["ipv6"], match["port"])


def _check_uri(scheme: str, rest: str) -> None:
    """The part after ``scheme:`` of a gRPC URI, as gRPC's resolver for ``scheme`` reads it."""
    if scheme == "dns":
        if rest.startswith("//"):  # dns://AUTHORITY/HOST:PORT names the DNS server; dns:///HOST:PORT does not
            _, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError("expected dns://AUTHORITY/HOST:PORT, or dns:///HOST:PORT")
        _host_port(rest, port_required=False)  # gRPC's dns resolver defaults the port to 443
    elif scheme in _FAMILY_NAMES:
        for address in rest.split(","):
            parsed = _host_port(address)
            if parsed.family != scheme:
                shown = f"[{parsed.host}]" if parsed.family == "ipv6" else parsed.host
                raise ValueError(f"{shown!r} is not an {_FAMILY_NAMES[scheme]} address")
    elif scheme == "vsock":
        cid, _, port = rest.partition(":")
        if not (cid.isascii() and cid.isdigit() and port):
            raise ValueError("expected vsock:CID:PORT")
        _check_port(port)
    elif not rest.strip("/"):
        raise ValueError("no socket path")


def _without_scheme(scheme: str, rest: str) -> str:
    """The advice for ``scheme://rest``, a URL where a gRPC address belongs."""
    where = rest.split("/", 1)[0]
    match = _HOST_PORT.fullmatch(where)
    if match is not None and match["port"] is None:
        where += ":" + {"http": "80", "https": "443"}.get(scheme, "PORT")
    advice = f"drop the scheme: give HOST:PORT, as in {where!r}"
    return advice + (" (and turn TLS on with tls=Tls())" if scheme == "https" else "")


def _check_address(address: str, *, alone: bool) -> _HostPort | None:
    """One address: ``HOST:PORT``, or a gRPC URI when it is ``alone`` (None then)."""
    scheme, _, rest = address.partition(":")
    if scheme in _GRPC_SCHEMES:
        if not alone:
            raise ValueError("a list of addresses takes IP:PORT, not a gRPC URI")
        _check_uri(scheme, rest)
        return None
    if rest.startswith("//"):
        raise ValueError(_without_scheme(scheme, rest[2:]))
    return _host_port(address)


def _checked(address: str, *, alone: bool) -> _HostPort | None:
    try:
        return _check_address(address, alone=alone)
    except ValueError as exc:
        raise ValueError(f"server address {address!r}: {exc}") from None


def _ip_target(address: str) -> tuple[str, str]:
    """('ipv4'|'ipv6', normalised address) for an ``IP:PORT`` or ``[IPv6]:PORT`` string."""
    parsed = _checked(address, alone=False)
    if parsed is None or parsed.family == "name":
        raise ValueError(
            f"server address {address!r}: a list of addresses takes IP:PORT; use one 'dns:///{address}' target "
            "to balance over the addresses a name resolves to"
        )
    ip = ipaddress.ip_address(parsed.host)
    return (parsed.family, f"{ip}:{parsed.port}" if ip.version == 4 else f"[{ip}]:{parsed.port}")


def resolve_target(url: str | Sequence[str]) -> str:
    """The gRPC target for ``url``, checked: ValueError naming the address that is malformed.

    One ``HOST:PORT`` (a DNS name, an IPv4 address, or an IPv6 address in brackets)
    or a gRPC URI (``dns:///name:port``, ``unix:path``, ``ipv4:ip:port,ip:port``...)
    is used as it is. Several addresses (a list, or one string with commas) must be
    IP literals and become one ``ipv4:`` or ``ipv6:`` target that the round-robin
    policy spreads calls over. A URL (``http://host:port``) is refused: gRPC has no
    use for its scheme. TypeError when ``url`` is not text or a list of text.
    """
    if isinstance(url, str):
        uri = url.strip().partition(":")[0] in _GRPC_SCHEMES  # ipv4:a,b is one target
        items = [url] if uri else url.split(",")
    elif isinstance(url, Sequence) and all(isinstance(item, str) for item in url):
        items = list(url)
    else:
        raise TypeError(f"server address {url!r}: expected HOST:PORT as a str, or a list of them")
    addresses = [a.strip() for a in items if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        _checked(addresses[0], alone=True)
        return addresses[0]
    parsed = [_ip_target(a) for a in addresses]
    families = {family for family, _ in parsed}
    if len(families) != 1:
        raise ValueError("a list of addresses must be all IPv4 or all IPv6")
    return f"{families.pop()}:{','.join(address for _, address in parsed)}"
