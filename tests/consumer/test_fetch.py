"""Image URL downloads refuse SSRF targets before any socket opens and enforce their limits.

Every test runs under a network guard: any connection to a non-loopback address, and any
name lookup that could reach real DNS, fails the test. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from i2v_fleet.consumer.errors import ImageFetchFailed, ImageRejected
from i2v_fleet.consumer.fetch import (
    FetchPolicy,
    check_addresses,
    fetch_image,
    parse_ip,
    resolve_and_check,
)

# -- the network guard -----------------------------------------------------------------


class ForbiddenConnection(RuntimeError):
    """Not an OSError, so no client library can swallow it as an ordinary network failure."""


@dataclass
class NetGuard:
    """Records every connection attempt and refuses any that leaves the loopback interface."""

    attempts: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def connecting(self, how: str, address: Any) -> None:
        if isinstance(address, (str, bytes)):  # AF_UNIX: never leaves the machine
            return
        host = str(address[0])
        self.attempts.append(host)
        if not _is_loopback(host):
            self.violations.append(f"{how} to {host}")
            raise ForbiddenConnection(f"{how} to {host}")

    def resolving(self, how: str, host: Any) -> None:
        if host is None:
            return
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name.partition("%")[0])
        except ValueError:
            self.violations.append(f"{how} of {name}")
            raise ForbiddenConnection(f"{how} of {name}") from None


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetGuard]:
    """Every test: loopback connections only, and no real DNS for names."""
    g = NetGuard()
    sock_connect, sock_connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo
    base, selector = asyncio.base_events.BaseEventLoop, asyncio.selector_events
    loop_create = base.create_connection
    loop_getaddrinfo = base.getaddrinfo
    loop_sock_connect = selector.BaseSelectorEventLoop.sock_connect

    def connect(self: socket.socket, address: Any) -> None:
        g.connecting("socket.connect", address)
        sock_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        g.connecting("socket.connect_ex", address)
        return sock_connect_ex(self, address)

    def create(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        g.connecting("socket.create_connection", address)
        return create_connection(address, *args, **kwargs)

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        g.resolving("socket.getaddrinfo", host)
        return getaddrinfo(host, *args, **kwargs)

    async def loop_connect(self: Any, factory: Any, host: Any = None, *args: Any, **kw: Any) -> Any:
        if host is not None:
            g.resolving("loop.create_connection", host)
            g.connecting("loop.create_connection", (host,))
        return await loop_create(self, factory, host, *args, **kw)

    async def loop_resolve(self: Any, host: Any, *args: Any, **kwargs: Any) -> Any:
        g.resolving("loop.getaddrinfo", host)
        return await loop_getaddrinfo(self, host, *args, **kwargs)

    async def loop_sock(self: Any, sock: socket.socket, address: Any) -> None:
        g.connecting("loop.sock_connect", address)
        await loop_sock_connect(self, sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(base, "create_connection", loop_connect)
    monkeypatch.setattr(base, "getaddrinfo", loop_resolve)
    monkeypatch.setattr(selector.BaseSelectorEventLoop, "sock_connect", loop_sock)
    yield g
    assert g.violations == [], "a test tried to leave the loopback interface"


class FakeDNS:
    """A resolver answering from a table; names it does not know fail like NXDOMAIN."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.answers[host])


PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"
DNS = {
    "public.test": [PUBLIC_V4, PUBLIC_V6],
    "internal.test": ["10.0.0.5"],
    "rebind.test": [PUBLIC_V4, "127.0.0.1"],
    "mixed6.test": [PUBLIC_V6, "fd00::1"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "nat64.test": ["64:ff9b::a9fe:a9fe"],
    "cgnat.test": ["100.100.100.100"],
    "sinkhole.test": ["0.0.0.0"],
    "localhost": ["127.0.0.1", "::1"],
}

# -- the SSRF corpus: each refused with no connection attempt at all -------------------

SSRF_CORPUS = [
    # loopback, every spelling inet_aton and the IPv6 parsers accept
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/x.png",
    "http://127.0.0.1./x.png",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7f.0.0.1/",
    "http://0X7F.0x0.0x0.0x1/",
    "http://0177.0.0.1/",
    "http://017700000001/",
    "http://0177.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://0x7f.1/",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[::ffff:0:127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://[64:ff9b::127.0.0.1]/",
    "http://localhost/",
    "http://localhost./",
    "http://LOCALHOST/",
    "http://images.localhost/",
    # private ranges
    "http://10.0.0.1/",
    "http://10.1/",
    "http://167772161/",
    "http://0xa.0.0.1/",
    "http://012.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://0xc0.0xa8.1.1/",
    "http://[0:0:0:0:0:ffff:10.0.0.1]/",
    "http://[64:ff9b::10.0.0.1]/",
    "http://[2002:a00:1::]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    "http://[fec0::1]/",
    # link-local and cloud metadata
    "http://169.254.169.254/latest/meta-data/",
    "http://0xa9fea9fe/",
    "http://2852039166/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    # unspecified, multicast, broadcast, shared and special-purpose ranges
    "http://0.0.0.0/",
    "http://0/",
    "http://[::]/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://239.255.255.250:1900/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://198.18.0.1/",
    "http://192.0.2.1/",
    "http://240.0.0.1/",
    "http://[2001:db8::1]/",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    # names whose DNS answers are private, or mix public and private
    "http://internal.test/x.png",
    "http://INTERNAL.test./x.png",
    "http://rebind.test/x.png",
    "http://mixed6.test/x.png",
    "http://metadata.test/latest/meta-data/",
    "http://mapped.test/x.png",
    "http://nat64.test/x.png",
    "http://cgnat.test/x.png",
    "http://sinkhole.test/x.png",
    "http://unknown.test/x.png",
    # schemes, credentials, missing hosts
    "file:///etc/passwd",
    "ftp://public.test/x.png",
    "gopher://127.0.0.1:70/_GET",
    "ws://public.test/",
    "http://user:pass@public.test/x.png",
    "http://:@public.test/x.png",
    "http:///x.png",
    "http://",
    "/x.png",
    "http://[zz::1]/",
    "http://%31%32%37.0.0.1/",
    "http://exa%6dple.test/",
]


@pytest.mark.parametrize("url", SSRF_CORPUS)
async def test_ssrf_corpus_is_refused_without_connecting(url: str, guard: NetGuard) -> None:
    """Each corpus URL fails with ImageFetchFailed and no connection is even attempted."""
    with pytest.raises(ImageFetchFailed):
        await fetch_image(url, FetchPolicy(), resolver=FakeDNS(DNS))
    assert guard.attempts == []


def test_the_corpus_is_large_enough() -> None:
    """The corpus keeps at least 40 distinct refused URLs."""
    assert len(set(SSRF_CORPUS)) == len(SSRF_CORPUS) >= 40


async def test_literals_and_localhost_never_reach_dns() -> None:
    """IP literals in any spelling and localhost are judged without asking the resolver."""
    dns = FakeDNS(DNS)
    for url in ("http://0x7f.1/", "http://[::ffff:7f00:1]/", "http://localhost./", "http://10.1/"):
        with pytest.raises(ImageFetchFailed):
            await fetch_image(url, FetchPolicy(), resolver=dns)
    assert dns.calls == []


async def test_messages_name_the_problem_and_host() -> None:
    """Refusals say what kind of address it was and how to get it allowed."""
    dns = FakeDNS(DNS)

    async def message(url: str) -> str:
        with pytest.raises(ImageFetchFailed) as caught:
            await fetch_image(url, FetchPolicy(), resolver=dns)
        return str(caught.value)

    assert await message("http://10.0.0.5/x.png") == (
        "image URL host 10.0.0.5 is a private address; "
        "only public hosts are fetched unless ALLOWED_HOSTS names the host"
    )
    assert "means 127.0.0.1, which is a loopback address" in await message("http://0x7f.1/")
    assert "resolves to 169.254.169.254, which is a link-local" in await message(
        "http://metadata.test/"
    )
    assert "resolves to 127.0.0.1" in await message("http://rebind.test/")
    assert "scheme 'file' is not allowed" in await message("file:///etc/passwd")
    assert "could not be resolved" in await message("http://unknown.test/")


async def test_messages_never_echo_queries_or_credentials() -> None:
    """Signatures in the query and passwords in the URL stay out of every message."""
    dns = FakeDNS(DNS)
    for url in (
        "http://internal.test/x.png?X-Amz-Signature=secret",
        "http://10.0.0.5/x.png?X-Amz-Signature=secret",
        "http://user:secret@public.test/x.png",
        "ftp://public.test/x.png?X-Amz-Signature=secret",
    ):
        with pytest.raises(ImageFetchFailed) as caught:
            await fetch_image(url, FetchPolicy(), resolver=dns)
        assert "secret" not in str(caught.value)
        assert "Signature" not in str(caught.value)


# -- the pure checks ---------------------------------------------------------------------


async def test_star_allows_a_host_whose_addresses_are_all_public(guard: NetGuard) -> None:
    """A name answering only public addresses passes the check; nothing is connected."""
    dns = FakeDNS(DNS)
    target = await resolve_and_check("https://public.test/x.png?sig=1", FetchPolicy(), dns)
    assert [str(ip) for ip in target.addresses] == [PUBLIC_V4, PUBLIC_V6]
    assert (target.host, str(target.url)) == ("public.test", "https://public.test/x.png?sig=1")
    assert dns.calls == ["public.test"]
    assert guard.attempts == []


@pytest.mark.parametrize(
    "address",
    [PUBLIC_V4, PUBLIC_V6, "::ffff:93.184.216.34", "64:ff9b::5db8:d822", "2002:5db8:d822::"],
)
def test_public_addresses_pass(address: str) -> None:
    """Public addresses, also inside IPv4-mapped, NAT64 and 6to4 forms, are allowed by `*`."""
    assert [str(ip) for ip in check_addresses("public.test", [address], FetchPolicy())] == [
        str(ipaddress.ip_address(address))
    ]


def test_named_hosts_may_be_private_but_never_unspecified() -> None:
    """An explicitly named host may resolve to private addresses, yet never to 0.0.0.0."""
    policy = FetchPolicy.from_env_value("images.corp, *.cdn.corp")
    assert check_addresses("images.corp", ["10.0.0.5"], policy)
    assert check_addresses("a.b.cdn.corp", ["127.0.0.1", "fd00::1"], policy)
    with pytest.raises(ImageFetchFailed, match="unspecified"):
        check_addresses("images.corp", ["0.0.0.0"], policy)
    with pytest.raises(ImageFetchFailed, match="multicast"):
        check_addresses("images.corp", ["ff02::1"], policy)


async def test_hosts_outside_the_list_are_refused_before_dns() -> None:
    """Without `*`, an unlisted host is refused without a lookup; wildcards need a dot."""
    dns = FakeDNS({"cdn.corp": [PUBLIC_V4], "evilcdn.corp": [PUBLIC_V4]})
    policy = FetchPolicy.from_env_value("*.cdn.corp")
    for url in ("http://cdn.corp/x.png", "http://evilcdn.corp/x.png", "http://93.184.216.34/"):
        with pytest.raises(ImageFetchFailed, match="not in ALLOWED_HOSTS"):
            await resolve_and_check(url, policy, dns)
    assert dns.calls == []


def test_allowed_hosts_are_parsed_and_normalised() -> None:
    """The env value is split, trimmed, lower-cased, and IP literals take canonical form."""
    policy = FetchPolicy.from_env_value(" Images.Corp. , *.CDN.corp,0x7f.1,[::1],, ")
    assert policy.allowed_hosts == ("images.corp", "*.cdn.corp", "127.0.0.1", "::1")
    assert FetchPolicy.from_env_value("*").allowed_hosts == ("*",)
    for bad in ("", " , ", "img*.corp", "*.", "*.*.corp"):
        with pytest.raises(ValueError, match="ALLOWED_HOSTS"):
            FetchPolicy.from_env_value(bad)


def _spell(value: int, parts: int, radixes: list[int]) -> str:
    head = [(value >> (8 * (3 - i))) & 0xFF for i in range(parts - 1)]
    last = value & (0xFFFFFFFF >> (8 * (parts - 1)))
    form = {10: "{}", 16: "0x{:x}", 8: "0{:o}"}
    return ".".join(form[r].format(v) for r, v in zip(radixes, [*head, last], strict=False))


_PRIVATE_NETS = ["10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]


@given(
    net=st.sampled_from(_PRIVATE_NETS),
    offset=st.integers(min_value=0, max_value=2**24 - 1),
    parts=st.integers(min_value=1, max_value=4),
    radixes=st.lists(st.sampled_from([8, 10, 16]), min_size=4, max_size=4),
)
def test_any_spelling_of_a_private_ipv4_is_refused(
    net: str, offset: int, parts: int, radixes: list[int]
) -> None:
    """Decimal, octal, hex and short spellings parse as inet_aton does and are refused."""
    network = ipaddress.IPv4Network(net)
    value = int(network.network_address) + offset % network.num_addresses
    spelled = _spell(value, parts, radixes)
    expected = ipaddress.IPv4Address(value)
    assert parse_ip(spelled) == expected
    assert socket.inet_aton(spelled) == expected.packed
    with pytest.raises(ImageFetchFailed, match="address; only public hosts"):
        check_addresses(spelled, [str(expected)], FetchPolicy())


@pytest.mark.parametrize(
    "host", ["0x", "08", "1..2", "256.1.1.1", "1.2.3.256", "4294967296", "1.2.3.4.5", "+1", "1e3"]
)
def test_strings_inet_aton_rejects_are_host_names(host: str) -> None:
    """What inet_aton refuses is not an IP literal here either, so it goes to the resolver."""
    assert parse_ip(host) is None
    with pytest.raises(OSError, match="illegal IP address"):
        socket.inet_aton(host)


# -- a real server on 127.0.0.1 ------------------------------------------------------------


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="GIF")
    return out.getvalue()


BODIES = {
    "png": PNG,
    "gif": _gif(),
    "html": b"\n  <!DOCTYPE html>\n<html><body>Access denied</body></html>",
    "empty": b"",
    "unknown": b"\x13\x37" * 200,
}
"""What `/body/{name}` serves, under whatever Content-Type the `type` query names."""


@dataclass
class Served:
    """The loopback image server of one test and what it saw."""

    server: TestServer = field(init=False)
    hosts: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a streaming handler found that the client had closed the connection."""

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


async def _stream_until_gone(
    request: web.Request, served: Served, *, delay: float
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    if "length" in request.query:
        response.content_length = int(request.query["length"])
    else:
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await response.write(PNG[:16])
        for _ in range(400):  # bounded, so a broken client side cannot hang the test
            await response.write(b"\0" * (64 * 1024 if delay == 0 else 1))
            await asyncio.sleep(delay)
    except ConnectionError:
        served.gone.set()
    except asyncio.CancelledError:
        served.gone.set()  # aiohttp cancels a handler whose client has disconnected
        raise
    return response


def _app(served: Served) -> web.Application:
    def record(request: web.Request) -> None:
        served.requests.append(request.path)
        served.hosts.append(request.host)

    async def image(request: web.Request) -> web.Response:
        record(request)
        return web.Response(body=PNG, content_type="image/png")

    async def hops(request: web.Request) -> web.Response:
        record(request)
        left = int(request.match_info["n"])
        raise web.HTTPFound(f"/hops/{left - 1}" if left > 1 else "/image.png")

    async def go(request: web.Request) -> web.Response:
        record(request)
        raise web.HTTPFound(request.query["to"])

    async def page(request: web.Request) -> web.Response:
        record(request)
        return web.Response(text="<!doctype html><p>not an image</p>", content_type="text/html")

    async def stream(request: web.Request) -> web.StreamResponse:
        record(request)
        return await _stream_until_gone(request, served, delay=0.0)

    async def trickle(request: web.Request) -> web.StreamResponse:
        record(request)
        return await _stream_until_gone(request, served, delay=0.05)

    async def slow(request: web.Request) -> web.Response:
        record(request)
        for _ in range(100):
            if request.transport is None or request.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        return web.Response(body=PNG, content_type="image/png")

    async def body(request: web.Request) -> web.Response:
        record(request)
        response = web.Response(body=BODIES[request.match_info["name"]])
        response.headers["Content-Type"] = request.query["type"]
        return response

    app = web.Application()
    app.router.add_get("/image.png", image)
    app.router.add_get("/body/{name}", body)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/go", go)
    app.router.add_get("/page", page)
    app.router.add_get("/stream", stream)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """An aiohttp server on 127.0.0.1 and a free port."""
    result = Served()
    result.server = TestServer(_app(result), host="127.0.0.1", port=0)
    await result.server.start_server()
    try:
        yield result
    finally:
        await result.server.close()


async def test_the_guard_sees_every_kind_of_connect(served: Served, guard: NetGuard) -> None:
    """The guard's patches are live (checked on loopback) and its rule refuses other hosts."""
    socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
    _, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.close()
    await writer.wait_closed()
    assert len(guard.attempts) >= 3  # create_connection, socket.connect, the loop's connect
    for address in [("10.0.0.1", 80), ("169.254.169.254", 80), ("example.com", 80)]:
        with pytest.raises(ForbiddenConnection):
            NetGuard().connecting("test", address)  # a fresh guard: this one must stay clean


LOOPBACK_ALLOWED = FetchPolicy(allowed_hosts=("127.0.0.1",), deadline_s=5.0)


async def test_an_allowed_loopback_server_serves_the_png(served: Served, guard: NetGuard) -> None:
    """Naming 127.0.0.1 in ALLOWED_HOSTS lets the download through, byte for byte."""
    assert await fetch_image(served.url("/image.png"), LOOPBACK_ALLOWED) == PNG
    assert guard.attempts
    assert all(_is_loopback(host) for host in guard.attempts)


async def test_a_legacy_spelling_of_an_allowed_literal_is_fetched(served: Served) -> None:
    """An allowed IP written as 0x7f.1 is normalised, matched and fetched."""
    assert await fetch_image(served.url("/image.png", "0x7f.1"), LOOPBACK_ALLOWED) == PNG


async def test_an_allowed_ipv6_literal_is_fetched(served: Served, guard: NetGuard) -> None:
    """An allowed IPv4-mapped IPv6 literal connects over IPv6 to the same loopback server."""
    policy = FetchPolicy(allowed_hosts=("[::ffff:127.0.0.1]",), deadline_s=5.0)
    assert await fetch_image(served.url("/image.png", "[::ffff:7f00:1]"), policy) == PNG
    assert "::ffff:7f00:1" in guard.attempts


async def test_the_same_server_is_refused_under_star(served: Served, guard: NetGuard) -> None:
    """Under `*` the loopback server is refused before any connection."""
    with pytest.raises(ImageFetchFailed, match="loopback address"):
        await fetch_image(served.url("/image.png"), FetchPolicy(), resolver=FakeDNS(DNS))
    assert guard.attempts == []
    assert served.requests == []


async def test_the_name_is_sent_while_the_checked_address_is_connected(
    served: Served, guard: NetGuard
) -> None:
    """The Host header carries the URL's name; the socket goes to the address checked once."""
    dns = FakeDNS({"images.test": ["127.0.0.1"]})
    policy = FetchPolicy(allowed_hosts=("images.test",), deadline_s=5.0)
    assert await fetch_image(served.url("/image.png", "images.test"), policy, resolver=dns) == PNG
    assert served.hosts == [f"images.test:{served.port}"]
    assert dns.calls == ["images.test"]
    assert guard.attempts
    assert set(guard.attempts) == {"127.0.0.1"}


@pytest.mark.parametrize(
    "to",
    ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"],
)
async def test_a_redirect_to_a_private_address_is_refused_before_connecting(
    served: Served, guard: NetGuard, to: str
) -> None:
    """A redirect from an allowed host to a private target is checked like the first URL."""
    with pytest.raises(ImageFetchFailed):
        await fetch_image(f"{served.url('/go')}?to={to}", LOOPBACK_ALLOWED)
    assert served.requests == ["/go"]
    assert set(guard.attempts) == {"127.0.0.1"}


async def test_redirects_within_the_allowed_server_are_followed(served: Served) -> None:
    """Up to three relative redirects lead to the image."""
    assert await fetch_image(served.url("/hops/3"), LOOPBACK_ALLOWED) == PNG
    assert served.requests == ["/hops/3", "/hops/2", "/hops/1", "/image.png"]


async def test_more_than_three_redirects_are_refused(served: Served) -> None:
    """A fourth redirect fails, and its target is never requested."""
    with pytest.raises(ImageFetchFailed, match="redirected more than 3 times"):
        await fetch_image(served.url("/hops/4"), LOOPBACK_ALLOWED)
    assert served.requests == ["/hops/4", "/hops/3", "/hops/2", "/hops/1"]


async def test_http_errors_fail_without_echoing_the_query(served: Served) -> None:
    """A 404 becomes ImageFetchFailed that names the status but not the signed query."""
    with pytest.raises(ImageFetchFailed, match="returned HTTP 404") as caught:
        await fetch_image(served.url("/missing.png?X-Amz-Signature=secret"), LOOPBACK_ALLOWED)
    assert "secret" not in str(caught.value)


async def test_a_web_page_is_rejected_as_not_an_image(served: Served) -> None:
    """An HTML body is ImageRejected, whatever the URL promised."""
    with pytest.raises(ImageRejected) as caught:
        await fetch_image(served.url("/page"), LOOPBACK_ALLOWED)
    assert caught.value.code == "image_invalid"
    assert str(caught.value) == (
        "URL did not return a JPEG, PNG or WebP image: the bytes are an HTML page "
        "(Content-Type said text/html)"
    )


NOT_AN_IMAGE = "URL did not return a JPEG, PNG or WebP image: "


@pytest.mark.parametrize(
    ("name", "content_type", "message"),
    [
        ("gif", "image/png", "the bytes are a GIF image (Content-Type said image/png)"),
        ("html", "image/jpeg", "the bytes are an HTML page (Content-Type said image/jpeg)"),
        ("empty", "image/png", "the body was empty (Content-Type said image/png)"),
        (
            "unknown",
            "application/octet-stream",
            "the bytes are not a known image format (Content-Type said application/octet-stream)",
        ),
        (
            "gif",
            "Image/GIF; charset=binary",
            "the bytes are a GIF image (Content-Type said image/gif)",
        ),
        (
            "gif",
            "image/<script>",
            "the bytes are a GIF image (Content-Type was not a valid MIME type)",
        ),
        ("gif", "garbage", "the bytes are a GIF image (Content-Type was not a valid MIME type)"),
    ],
    ids=["gif-as-png", "html-as-jpeg", "empty", "unknown", "params-dropped", "unsafe", "no-slash"],
)
async def test_a_refusal_says_what_the_bytes_are_and_what_the_header_said(
    served: Served, name: str, content_type: str, message: str
) -> None:
    """The sniffed format of the body is named, next to the Content-Type the server sent,
    of which nothing but a well-formed MIME type is repeated."""
    with pytest.raises(ImageRejected) as caught:
        await fetch_image(served.url(f"/body/{name}?type={content_type}"), LOOPBACK_ALLOWED)
    assert caught.value.code == "image_invalid"
    assert str(caught.value) == NOT_AN_IMAGE + message


async def test_the_bytes_decide_not_the_content_type(served: Served) -> None:
    """A PNG served as text/html is fetched: servers mislabel images all the time."""
    assert await fetch_image(served.url("/body/png?type=text/html"), LOOPBACK_ALLOWED) == PNG


@pytest.mark.parametrize(
    "path",
    ["/stream?length=50000000", "/stream", "/trickle?length=50000000"],
    ids=["content-length", "chunked", "content-length-before-any-body"],
)
async def test_an_oversized_body_is_refused_and_the_connection_closed(
    served: Served, path: str
) -> None:
    """Over max_bytes, with or without Content-Length, fails and drops the connection."""
    policy = FetchPolicy(allowed_hosts=("127.0.0.1",), max_bytes=200_000, deadline_s=5.0)
    with pytest.raises(ImageFetchFailed, match=r"image download exceeded 0\.2 MiB"):
        await fetch_image(served.url(path), policy)
    await asyncio.wait_for(served.gone.wait(), 3.0)


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
async def test_a_slow_server_exceeds_the_deadline(served: Served, path: str) -> None:
    """Slow headers or a trickling body both hit the total deadline."""
    policy = FetchPolicy(allowed_hosts=("127.0.0.1",), deadline_s=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ImageFetchFailed, match=r"took longer than 0\.5 s"):
        await fetch_image(served.url(path), policy)
    assert loop.time() - started < 2.0


# -- TLS: SNI and certificate checks use the name, not the address ------------------------


def _self_signed(tmp_path: Path, name: str) -> ssl.SSLContext:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def test_https_sends_the_host_name_as_sni_and_verifies_the_certificate(
    tmp_path: Path, guard: NetGuard
) -> None:
    """The TLS handshake names images.test while the socket goes to 127.0.0.1."""
    context = _self_signed(tmp_path, "images.test")
    sni: list[str | None] = []

    def remember(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(name)

    context.sni_callback = remember
    server = TestServer(web.Application(), host="127.0.0.1", port=0, scheme="https")
    await server.start_server(ssl=context)
    try:
        dns = FakeDNS({"images.test": ["127.0.0.1"]})
        policy = FetchPolicy(allowed_hosts=("images.test",), deadline_s=5.0)
        url = f"https://images.test:{server.port}/x.png"
        with pytest.raises(ImageFetchFailed, match="TLS certificate of image URL host images"):
            await fetch_image(url, policy, resolver=dns)
    finally:
        await server.close()
    assert sni == ["images.test"]
    assert set(guard.attempts) == {"127.0.0.1"}
