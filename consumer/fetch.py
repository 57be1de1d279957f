"""Image URL downloads: the one place that opens a job's image URL, hardened against SSRF.

Owns URL and address checks, redirects, the size and time limits and refusing bodies that are
not images (the sniffer itself is `pipeline.formats`). Must
never open a socket to an address it has not checked, nor echo query strings or fetched bytes.

Over 400 lines on purpose: the address rules and the connection that uses them stay in one
file, so no code path can open a socket without passing the checks written beside it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from i2v_fleet.pipeline.formats import ALLOWED_NAMES, SNIFF_BYTES, format_noun, sniff_format

from .errors import ImageFetchFailed, ImageRejected

__all__ = [
    "FetchPolicy",
    "IPAddress",
    "Resolver",
    "SystemResolver",
    "Target",
    "check_addresses",
    "fetch_image",
    "parse_ip",
    "resolve_and_check",
]

IPAddress = IPv4Address | IPv6Address
_MiB = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
_ALLOW_PRIVATE = "only public hosts are fetched unless ALLOWED_HOSTS names the host"

# Written out instead of trusting `ip.is_global`, whose answer has changed between Python
# releases (it calls multicast, 6to4 and IPv4-translated addresses global in 3.11).
# fmt: off
_NOT_PUBLIC_V4 = tuple(IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))
# fmt: on
# IPv6 unicast on the internet lives in 2000::/3; these are the special blocks inside it.
_GLOBAL_UNICAST_V6 = IPv6Network("2000::/3")
# Teredo, benchmarking and ORCHID (2001::/23), then the two documentation blocks.
_NOT_PUBLIC_V6 = tuple(IPv6Network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20"))
_SIX_TO_FOUR = IPv6Network("2002::/16")
_NAT64 = IPv6Network("64:ff9b::/96")  # DNS64 answers these for IPv4-only hosts: judge the IPv4
_SHARED_V4 = IPv4Network("100.64.0.0/10")
_PRIVATE: tuple[IPv4Network | IPv6Network, ...] = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv6Network("fc00::/7"),
)
_BROADCAST_V4 = IPv4Address("255.255.255.255")
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # after IDNA encoding, lower case
_SAFE_MIME = re.compile(r"[a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,60}")


@dataclass(frozen=True)
class FetchPolicy:
    """Which hosts image URLs may name, and how much time and data one download may take."""

    allowed_hosts: tuple[str, ...] = ("*",)
    """`*` (any host whose addresses are all public), `name`, `*.suffix` or an IP literal.
    A named host may resolve to private or loopback addresses: that is how an operator
    allows an internal image server."""
    max_bytes: int = 20 * _MiB
    deadline_s: float = 20.0
    """Total time for the download, across DNS, redirects and the body."""
    connect_timeout_s: float = 5.0
    max_redirects: int = 3
    user_agent: str = "i2v-fleet"

    def __post_init__(self) -> None:
        entries = tuple(_normalise_entry(e) for e in self.allowed_hosts if e.strip())
        if not entries:
            raise ValueError("ALLOWED_HOSTS is empty; use * for any public host or name hosts")
        object.__setattr__(self, "allowed_hosts", entries)
        if self.max_bytes < 1 or self.deadline_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("max_bytes, deadline_s and connect_timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be 0 or more")

    @classmethod
    def from_env_value(
        cls,
        allowed_hosts: str,
        *,
        max_bytes: int = 20 * _MiB,
        deadline_s: float = 20.0,
        connect_timeout_s: float = 5.0,
        max_redirects: int = 3,
        user_agent: str = "i2v-fleet",
    ) -> FetchPolicy:
        """The policy for an `ALLOWED_HOSTS` value such as `*` or `images.corp, *.cdn.corp`."""
        return cls(
            allowed_hosts=tuple(allowed_hosts.split(",")),
            max_bytes=max_bytes,
            deadline_s=deadline_s,
            connect_timeout_s=connect_timeout_s,
            max_redirects=max_redirects,
            user_agent=user_agent,
        )


def _normalise_entry(raw: str) -> str:
    entry = raw.strip().lower()
    if entry == "*":
        return entry
    name = entry.removeprefix("[").removesuffix("]").rstrip(".")
    ip = parse_ip(name)
    if ip is not None:
        return str(ip)
    suffix = name.removeprefix("*.")
    if not suffix or "*" in suffix or suffix.startswith("."):
        raise ValueError(f"ALLOWED_HOSTS entry {raw.strip()!r}: use *, a host name or *.suffix")
    return name


class Resolver(Protocol):
    """Turns a host name into IP address strings; tests inject a fake one."""

    async def resolve(self, host: str, port: int) -> list[str]: ...


class SystemResolver:
    """The operating system's resolver, run off the event loop."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """One checked hop: the URL to request and the only addresses it may connect to."""

    url: URL
    host: str
    addresses: tuple[IPAddress, ...]


def parse_ip(host: str) -> IPAddress | None:
    """The address `host` denotes if it is an IP literal in any spelling inet_aton accepts."""
    if ":" in host:
        try:
            return IPv6Address(host)
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    # `0x` is hex and a leading 0 octal; the last part fills all remaining bytes (127.1).
    values = [
        int(p, 16) if p[:2] in ("0x", "0X") else int(p, 8 if p[0] == "0" else 10) for p in parts
    ]
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 256 ** (5 - len(values)):
        return None
    return IPv4Address(sum(v << (8 * (3 - i)) for i, v in enumerate(head)) + last)


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, IPv4Address):
        return ip.is_global and not any(ip in net for net in _NOT_PUBLIC_V4)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return _is_public(embedded)
    return ip in _GLOBAL_UNICAST_V6 and not any(ip in net for net in _NOT_PUBLIC_V6)


def _embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    # These forms deliver the packet to the IPv4 address inside, so that address is judged.
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour if ip in _SIX_TO_FOUR else None


def _kind(ip: IPAddress) -> str:
    embedded = _embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
    if embedded is not None:
        return _kind(embedded)
    if ip.is_unspecified:
        return "an unspecified"
    if ip.is_loopback:
        return "a loopback"
    if ip.is_link_local:
        return "a link-local"
    if ip.is_multicast:
        return "a multicast"
    if ip == _BROADCAST_V4:
        return "a broadcast"
    if ip in _SHARED_V4:
        return "a carrier-grade NAT"
    return "a private" if any(ip in net for net in _PRIVATE) else "a special-purpose"


def _is_named(host: str, ip: IPAddress | None, policy: FetchPolicy) -> bool:
    if ip is not None:
        return str(ip) in policy.allowed_hosts
    return any(
        host.endswith(entry[1:]) if entry.startswith("*.") else host == entry
        for entry in policy.allowed_hosts
    )


def check_addresses(
    host: str, addresses: Sequence[str], policy: FetchPolicy
) -> tuple[IPAddress, ...]:
    """The parsed `addresses` of `host` if every one may be connected to, else `ImageFetchFailed`.

    `host` is the URL's host, lower case without a trailing dot. One bad address refuses the
    whole answer: a DNS reply mixing public and private addresses is an attack, not a choice.
    """
    ips = tuple(ip for a in addresses if (ip := parse_ip(a.partition("%")[0])) is not None)
    if not ips or len(ips) != len(addresses):
        raise ImageFetchFailed(f"image URL host {host} did not resolve to IP addresses")
    literal = parse_ip(host)
    named = _is_named(host, literal, policy)
    for ip in ips:
        where = f"image URL host {host}"
        if str(ip) != host:
            where += f" {'means' if literal else 'resolves to'} {ip}, which"
        # Never connectable on purpose; DNS sinkholes answer 0.0.0.0 even for allowed names.
        if ip.is_unspecified or ip.is_multicast or ip == _BROADCAST_V4:
            raise ImageFetchFailed(f"{where} is {_kind(ip)} address; use a reachable host")
        if not named and not _is_public(ip):
            raise ImageFetchFailed(f"{where} is {_kind(ip)} address; {_ALLOW_PRIVATE}")
    return ips


async def resolve_and_check(url: str | URL, policy: FetchPolicy, resolver: Resolver) -> Target:
    """Check one hop's URL against the policy, resolving its host once; no socket is opened."""
    try:
        url = URL(url) if isinstance(url, str) else url
        raw_host, authority = url.raw_host, url.raw_authority
    except ValueError:
        raise ImageFetchFailed("image URL is not a valid URL") from None
    if not url.scheme:
        raise ImageFetchFailed("image URL is relative; give an absolute http(s) URL")
    if url.scheme not in _DEFAULT_PORTS:
        raise ImageFetchFailed(
            f"image URL scheme {url.scheme[:20]!r} is not allowed; use http or https"
        )
    if not raw_host:
        raise ImageFetchFailed("image URL has no host; give an absolute http(s) URL")
    host = raw_host.lower().rstrip(".")
    if "@" in authority:
        raise ImageFetchFailed(
            f"image URL for host {host} contains a user name or password; "
            "use a presigned URL or an s3 image instead"
        )
    if ":" in host and "%" in host:
        raise ImageFetchFailed(f"image URL host {host} has an IPv6 zone id; remove it")
    ip = parse_ip(host)
    if ip is None and not (len(host) <= 253 and _HOST_NAME.fullmatch(host)):
        # Also refuses percent-escapes and stray characters some resolvers would reinterpret.
        raise ImageFetchFailed(f"image URL host {host[:100]!r} is not a valid host name")
    named = _is_named(host, ip, policy)
    if not named and "*" not in policy.allowed_hosts:
        raise ImageFetchFailed(
            f"image URL host {host} is not in ALLOWED_HOSTS; use an allowed host "
            "or ask the operator to add it"
        )
    port = url.port or _DEFAULT_PORTS[url.scheme]
    if ip is not None:
        # aiohttp refuses legacy spellings (127.1) and would resolve hex ones as names.
        return Target(url.with_host(str(ip)), host, check_addresses(host, [str(ip)], policy))
    if not named and (host == "localhost" or host.endswith(".localhost")):
        answer = ["127.0.0.1"]  # RFC 6761: loopback by definition, no need to ask DNS
    else:
        try:
            answer = await resolver.resolve(host, port)
        except OSError:
            raise ImageFetchFailed(f"image URL host {host} could not be resolved") from None
    return Target(url, host, check_addresses(host, answer, policy))


class _PinnedResolver(AbstractResolver):
    """Hands aiohttp the addresses already checked, so the name is never resolved again:
    a second lookup could answer differently (DNS rebinding)."""

    def __init__(self, target: Target) -> None:
        self._target = target

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".") != self._target.host:
            raise OSError(f"host {host} was not checked")
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self._target.addresses
        ]

    async def close(self) -> None:
        pass


async def fetch_image(url: str, policy: FetchPolicy, *, resolver: Resolver | None = None) -> bytes:
    """Download an image URL and return its bytes, refusing anything the policy forbids.

    Raises `ImageFetchFailed` for refused addresses, network and HTTP failures and the size
    and time limits, and `ImageRejected` when the body is not JPEG, PNG or WebP.
    """
    try:
        return await asyncio.wait_for(
            _follow(url, policy, resolver or SystemResolver()), policy.deadline_s
        )
    except asyncio.TimeoutError:
        raise ImageFetchFailed(
            f"image download took longer than {policy.deadline_s:g} s; "
            "use a faster host or a smaller image"
        ) from None


async def _follow(url: str, policy: FetchPolicy, resolver: Resolver) -> bytes:
    current: str | URL = url
    for _ in range(policy.max_redirects + 1):
        target = await resolve_and_check(current, policy, resolver)
        result = await _get(target, policy)
        if isinstance(result, bytes):
            return result
        current = result
    raise ImageFetchFailed(
        f"image URL redirected more than {policy.max_redirects} times; link the image itself"
    )


async def _get(target: Target, policy: FetchPolicy) -> bytes | URL:
    # A fresh connector per hop: its resolver knows only this hop's checked addresses, and
    # force_close drops the socket as soon as we stop reading (an oversized body, say).
    connector = aiohttp.TCPConnector(
        resolver=_PinnedResolver(target), use_dns_cache=False, force_close=True
    )
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s),
        trust_env=False,  # no proxies from the environment: they would bypass the checks
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,  # we asked for identity; a gzip body then fails the sniff
    ) as session:
        headers = {
            "User-Agent": policy.user_agent,
            "Accept": "image/jpeg, image/png, image/webp",
            "Accept-Encoding": "identity",
        }
        try:
            async with session.get(target.url, headers=headers, allow_redirects=False) as resp:
                return await _handle(resp, target, policy)
        except aiohttp.ClientError as exc:
            # `from None`: aiohttp's own messages may carry the full URL with its query.
            raise ImageFetchFailed(_describe(exc, target.host, policy)) from None


async def _handle(resp: aiohttp.ClientResponse, target: Target, policy: FetchPolicy) -> bytes | URL:
    if resp.status in _REDIRECTS:
        location = resp.headers.get("Location")
        if not location:
            raise ImageFetchFailed(f"image URL host {target.host} redirected without a Location")
        try:
            return target.url.join(URL(location)).with_fragment(None)
        except ValueError:
            raise ImageFetchFailed(
                f"image URL host {target.host} sent an invalid redirect"
            ) from None
    if not 200 <= resp.status < 300:
        raise ImageFetchFailed(
            f"image URL returned HTTP {resp.status}; check that the URL is right and not expired"
        )
    too_big = f"image download exceeded {policy.max_bytes / _MiB:.1f} MiB; send a smaller image"
    if resp.content_length is not None and resp.content_length > policy.max_bytes:
        raise ImageFetchFailed(too_big)
    body = bytearray()
    sniffed = False
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > policy.max_bytes:
            raise ImageFetchFailed(too_big)
        if not sniffed and len(body) >= SNIFF_BYTES:
            _sniff(body, resp)  # refuse a web page before downloading all of it
            sniffed = True
    if not sniffed:
        _sniff(body, resp)
    return bytes(body)


def _sniff(body: bytearray, resp: aiohttp.ClientResponse) -> None:
    # The bytes decide, not Content-Type: servers label images wrongly all the time.
    name = sniff_format(bytes(body[:SNIFF_BYTES]))
    if name in ALLOWED_NAMES:
        return
    if not body:
        found = "the body was empty"
    elif name is None:
        found = "the bytes are not a known image format"
    else:
        found = f"the bytes are {format_noun(name)}"
    raise ImageRejected(
        f"URL did not return a JPEG, PNG or WebP image: {found} ({_labelled(resp)})"
    )


def _labelled(resp: aiohttp.ClientResponse) -> str:
    """What the Content-Type header said: only a well-formed MIME type is ever repeated."""
    raw = resp.headers.get("Content-Type")
    if raw is None:
        return "no Content-Type"
    # From the header itself: aiohttp's parsed value turns an invalid one into a default.
    mime = raw.partition(";")[0].strip().lower()
    if _SAFE_MIME.fullmatch(mime):
        return f"Content-Type said {mime}"
    return "Content-Type was not a valid MIME type"


def _describe(exc: aiohttp.ClientError, host: str, policy: FetchPolicy) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of image URL host {host} could not be verified"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake with image URL host {host} failed"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"could not connect to image URL host {host} within {policy.connect_timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to image URL host {host}; check that it is reachable"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"image URL host {host} sent an invalid HTTP response"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return f"connection to image URL host {host} broke during the download"
    return f"image download from host {host} failed ({type(exc).__name__})"
