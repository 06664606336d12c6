"""Which image URLs may be fetched (SSRF guard, ml_backend.image_urls, through ImageFetcher with
a mock transport and a fake DNS): hosts beyond Label Studio and the allowlist, ``*`` only for
public addresses, the address checked is the one connected to, paths that climb out of their
root, other schemes, proxies of the environment. Nothing here reaches a network."""

from __future__ import annotations

import base64
import socket

import httpx
import pytest

from ml_backend.errors import ImageFetchError, InvalidRequestError
from ml_backend.image_urls import proxied, resolve_image_url
from ml_backend.images import FetchConfig, ImageFetcher

LS_URL = "http://ls.example:8080"


def public_dns(host: str, port: int) -> list[str]:
    """No DNS here: every name resolves to one public address."""
    return ["93.184.215.14"]


def fetcher(calls: list[str], allowed: tuple[str, ...] | None, ls_url: str = "http://ls:8080",
            resolve=public_dns) -> ImageFetcher:
    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(200, content=b"bytes")

    return ImageFetcher(FetchConfig(allowed_hosts=allowed), default_ls_url=ls_url,
                        default_token="t", transport=httpx.MockTransport(answer),
                        resolve=resolve)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",
    "http://127.0.0.1:6379/",
    "http://ls:8081/data/upload/1/a.png",          # Label Studio's host, another port
    "https://ls:8080/data/upload/1/a.png",         # another scheme, hence another origin
    "http://ls:8080@evil.example/a.png",           # user info posing as the host
    "http://cdn.example.evil.example/a.png",
])
def test_hosts_other_than_label_studio_and_the_allowlist_are_refused(url):
    calls: list[str] = []
    with pytest.raises(InvalidRequestError, match="IMAGE_HOST_ALLOWLIST"):
        fetcher(calls, ("cdn.example",)).fetch(url, None, None)
    assert calls == []


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://ls:8080/data/upload/1/a.png", ()),
    ("/data/upload/1/a.png", ()),
    ("https://cdn.example/a.png", ("cdn.example",)),
    ("https://cdn.example:8443/a.png", ("cdn.example:8443",)),
    ("https://anything.example/a.png", ("*",)),
    ("https://anything.example/a.png", None),      # the library default: no restriction
])
def test_label_studio_and_allowed_hosts_are_fetched(url, allowed):
    calls: list[str] = []
    assert fetcher(calls, allowed).fetch(url, None, None) == b"bytes"
    assert len(calls) == 1


@pytest.mark.parametrize(("url", "dns"), [
    ("http://internal.example/a.png", ["10.0.0.7"]),           # an internal name
    ("http://rebind.example/a.png", ["93.184.215.14", "127.0.0.1"]),  # one public, one not
    ("http://127.0.0.1:6379/", None),                           # IP literals, as they are
    ("http://[::ffff:169.254.169.254]/latest/meta-data/", None),
    ("http://2130706433/", None),                               # 127.0.0.1 in decimal
])
def test_a_star_allows_public_addresses_only_checked_on_what_the_name_resolves_to(url, dns):
    """`IMAGE_HOST_ALLOWLIST=*` once turned every check off."""
    calls: list[str] = []
    resolve = (lambda host, port: dns) if dns else lambda host, port: [
        info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    with pytest.raises(InvalidRequestError, match="not a public address.*IMAGE_HOST_ALLOWLIST"):
        fetcher(calls, ("*",), resolve=resolve).fetch(url, None, None)
    assert calls == []


def test_the_address_checked_is_the_one_connected_to():
    """A name that answers a public address to the check and a private one to a second lookup
    (DNS rebinding) is fetched from the address checked, with its own Host header."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    seen: list[tuple[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"]))
        return httpx.Response(200, content=b"bytes")

    f = ImageFetcher(FetchConfig(allowed_hosts=("*",)), transport=httpx.MockTransport(answer),
                     resolve=lambda host, port: next(answers))
    assert f.fetch("http://rebind.example:8000/a.png", None, None) == b"bytes"
    assert seen == [("http://93.184.215.14:8000/a.png", "rebind.example:8000")]


@pytest.mark.parametrize("url", [
    "/data/local-files/?d=../../etc/passwd",
    "/data/local-files/?d=dir/../../secret.png",
    "/data/local-files/?d=/etc/passwd",
    "/data/local-files/?d=%2e%2e/secret.png",
    "/data/local-files/?d=dir%5C..%5C..%5Csecret.png",
    "/data/local-files/?d=C:/secret.png",
    "/data/local-files/?d=dir/a.png%00.png",
    "/data/local-files/?d=",
    "http://ls:8080/data/local-files/?d=../secret.png",
    "/data/upload/../../api/users",
    "/data/upload/%2e%2e/%2e%2e/api/users",
])
def test_paths_escaping_their_root_are_refused_before_any_request(url):
    calls: list[str] = []
    with pytest.raises(InvalidRequestError, match=r"'\.\.'|relative"):
        fetcher(calls, ()).fetch(url, None, None)
    assert calls == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO",
                                 "ftp://ls/a.png"])
def test_other_schemes_are_refused_before_any_request(url):
    calls: list[str] = []
    with pytest.raises(InvalidRequestError):  # 400: the client's input, not a server error
        fetcher(calls, ()).fetch(url, None, None)
    assert calls == []


def test_scheme_relative_url_stays_on_label_studio():
    calls: list[str] = []
    fetcher(calls, ()).fetch("//evil.example/a.png", None, None)
    assert calls == ["http://ls:8080/evil.example/a.png"]


def test_a_proxy_of_the_environment_is_seen_and_then_connects_by_name(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "ls")
    assert proxied("http://cdn.example/a.png")
    assert not proxied("http://ls:8080/a.png") and not proxied("https://cdn.example/a.png")


def test_url_resolution():
    assert resolve_image_url("/data/upload/19/a.png", LS_URL, 4) == f"{LS_URL}/data/upload/19/a.png"
    assert resolve_image_url("/data/local-files/?d=dir/a.png", LS_URL + "/", None) == \
        f"{LS_URL}/data/local-files/?d=dir/a.png"
    assert resolve_image_url("upload/19/a.png", LS_URL, None) == f"{LS_URL}/data/upload/19/a.png"
    assert resolve_image_url("https://cdn.example/a.png", None, None) == "https://cdn.example/a.png"
    presign = resolve_image_url("s3://bucket/a.png", LS_URL, 7)
    assert presign == f"{LS_URL}/tasks/7/presign/?fileuri=" + base64.urlsafe_b64encode(
        b"s3://bucket/a.png").decode()
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        resolve_image_url("/data/upload/19/a.png", None, 4)
    with pytest.raises(ImageFetchError, match="task id"):
        resolve_image_url("gs://b/a.png", LS_URL, None)
    for url in ("ftp://x/a.png", "file:///etc/passwd", "javascript:alert(1)"):
        with pytest.raises(InvalidRequestError, match="unsupported image URL"):  # the client's
            resolve_image_url(url, LS_URL, None)
