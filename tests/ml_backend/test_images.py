"""Image downloads (ml_backend.images): Label Studio tokens (legacy and personal access) sent
to Label Studio only, redirects and presigned URLs, the download cache, decoding."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import ImageFetchError, InvalidImageError, InvalidRequestError
from ml_backend.images import FetchConfig, ImageFetcher, decode_rgb
from tests.ml_backend.conftest import synthetic_png

LS = "http://ls.example:8080"


def PUBLIC_DNS(host: str, port: int) -> list[str]:  # noqa: N802 - a constant resolver
    """Every cloud storage host of these tests resolves to one public address (no DNS here)."""
    return ["52.216.0.1"]


def jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part(claims)}.signature"


class FakeServer:
    """httpx MockTransport standing in for Label Studio and a CDN."""

    def __init__(self, refresh: str | None = None, access: str | None = None):
        self.calls: list[tuple[str, str, str]] = []
        self.refresh, self.access = refresh, access

    def __call__(self, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        self.calls.append((request.method, request.url.path, auth))
        if request.url.path == "/api/token/refresh/":
            if json.loads(request.content).get("refresh") == self.refresh:
                return httpx.Response(200, json={"access": self.access})
            return httpx.Response(401)
        if request.url.host == "cdn.example":
            return httpx.Response(200, content=b"cdn-bytes")
        if auth in ("Token legacy", f"Bearer {self.access}"):
            return httpx.Response(200, content=b"ls-bytes")
        return httpx.Response(401)


def fetcher(server: FakeServer, **kwargs) -> ImageFetcher:
    return ImageFetcher(FetchConfig(**kwargs), transport=httpx.MockTransport(server))


def test_legacy_token_is_sent_only_to_label_studio_and_bytes_are_cached():
    server = FakeServer()
    f = fetcher(server)
    assert f.fetch("/data/upload/1/a.png", LS, "legacy") == b"ls-bytes"
    assert f.fetch("/data/upload/1/a.png", LS, "legacy") == b"ls-bytes"
    assert f.fetch("https://cdn.example/b.png", LS, "legacy") == b"cdn-bytes"
    assert server.calls == [("GET", "/data/upload/1/a.png", "Token legacy"),
                            ("GET", "/b.png", "")]


def test_personal_access_token_is_exchanged_once_for_a_bearer_token():
    access = jwt({"token_type": "access", "exp": time.time() + 3600})
    server = FakeServer(refresh=jwt({"token_type": "refresh"}), access=access)
    f = fetcher(server)
    f.fetch("/data/upload/1/a.png", LS, server.refresh)
    f.fetch("/data/upload/1/b.png", LS, server.refresh)
    assert [c[1] for c in server.calls] == ["/api/token/refresh/", "/data/upload/1/a.png",
                                            "/data/upload/1/b.png"]
    assert server.calls[1][2] == f"Bearer {access}"


def test_refused_token_and_missing_token_are_clear_errors():
    f = fetcher(FakeServer())
    with pytest.raises(ImageFetchError, match="HTTP 401.*check the token"):
        f.fetch("/data/upload/1/a.png", LS, "wrong")
    with pytest.raises(ImageFetchError, match="needs a Label Studio token"):
        f.fetch("/data/upload/1/a.png", LS, None)
    with pytest.raises(ImageFetchError, match="refused the personal access token"):
        f.fetch("/data/upload/1/a.png", LS, jwt({"token_type": "refresh"}))


def test_settings_token_wins_and_disk_cache_is_used(tmp_path):
    server = FakeServer()
    first = ImageFetcher(FetchConfig(disk_cache_dir=str(tmp_path)), default_ls_url=LS,
                         default_token="legacy", transport=httpx.MockTransport(server))
    assert first.fetch("/data/upload/1/a.png", "http://other", "wrong") == b"ls-bytes"
    second = ImageFetcher(FetchConfig(disk_cache_dir=str(tmp_path)), default_ls_url=LS,
                          default_token="legacy", transport=httpx.MockTransport(server))
    assert second.fetch("/data/upload/1/a.png", None, None) == b"ls-bytes"
    assert len(server.calls) == 1


def test_decode_png_to_rgb_uint8():
    rgb = decode_rgb(synthetic_png(400, 300), max_pixels=10**6)
    assert rgb.shape == (300, 400, 3) and rgb.dtype == np.uint8
    buffer = io.BytesIO()
    Image.new("LA", (5, 4)).save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue(), max_pixels=100).shape == (4, 5, 3)


def test_corrupt_and_oversized_images_are_refused():
    with pytest.raises(InvalidImageError, match="cannot be decoded"):
        decode_rgb(b"\x89PNG\r\n\x1a\nnot a png", max_pixels=10**6)
    with pytest.raises(InvalidImageError, match="MAX_IMAGE_PIXELS"):
        decode_rgb(synthetic_png(400, 300), max_pixels=1000)


def test_every_redirect_hop_is_checked_and_the_token_stays_on_label_studio():
    """An allowed host redirecting to the metadata service, or Label Studio redirecting to a
    host nobody allowed, is refused before that host is asked; the token never leaves."""
    seen: list[tuple[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization", "")))
        if request.url.host == "cdn.example":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/"})
        if request.url.path == "/data/upload/1/moved.png":
            return httpx.Response(302, headers={"location": "https://cdn.example/img.png"})
        if request.url.path == "/data/upload/1/away.png":
            return httpx.Response(302, headers={"location": "http://evil.example/x.png"})
        if request.url.path == "/data/upload/1/loop.png":
            return httpx.Response(302, headers={"location": "/data/upload/1/loop.png"})
        return httpx.Response(200, content=b"img")

    f = ImageFetcher(FetchConfig(allowed_hosts=("cdn.example",)), default_ls_url=LS,
                     default_token="legacy", transport=httpx.MockTransport(answer))
    with pytest.raises(InvalidRequestError, match="169.254.169.254"):
        f.fetch("https://cdn.example/a.png", None, None)
    with pytest.raises(InvalidRequestError, match="evil.example"):
        f.fetch("/data/upload/1/away.png", None, None)
    with pytest.raises(InvalidRequestError, match="169.254.169.254"):
        f.fetch("/data/upload/1/moved.png", None, None)  # LS -> CDN (allowed) -> metadata
    with pytest.raises(ImageFetchError, match="redirects"):
        f.fetch("/data/upload/1/loop.png", None, None)
    assert not any("169.254" in url or "evil" in url for url, _ in seen)
    assert all(auth == "" for url, auth in seen if not url.startswith(LS))
    assert all(auth == "Token legacy" for url, auth in seen if url.startswith(LS))


def test_a_presign_redirect_may_reach_the_cloud_storage_host():
    def answer(request: httpx.Request) -> httpx.Response:
        if "/presign/" in request.url.path:
            return httpx.Response(303, headers={"location": "https://bucket.s3.example/k?sig=1"})
        assert request.headers.get("authorization") is None  # the token stays behind
        return httpx.Response(200, content=b"cloud-bytes")

    f = ImageFetcher(FetchConfig(allowed_hosts=()), default_ls_url=LS, default_token="legacy",
                     transport=httpx.MockTransport(answer), resolve=PUBLIC_DNS)
    assert f.fetch("s3://bucket/k.png", None, None, task_id=7) == b"cloud-bytes"


@pytest.mark.parametrize("path", ["/data/upload/1/presign/a.png", "/api/presign/", "/presign/",
                                  "/tasks/7/presign/x", "/tasks/x/presign/", "/data/tasks/7/presign/"])
def test_only_label_studios_own_presign_route_may_leave_for_another_host(path):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "ls.example":
            return httpx.Response(303, headers={"location": "https://evil.example/k?sig=1"})
        return httpx.Response(200, content=b"stolen")

    f = ImageFetcher(FetchConfig(allowed_hosts=()), default_ls_url=LS, default_token="legacy",
                     transport=httpx.MockTransport(answer), resolve=PUBLIC_DNS)
    with pytest.raises(InvalidRequestError, match="evil.example"):
        f.fetch(path, None, None)
    assert not any("evil" in url for url in seen)


@pytest.mark.parametrize("target, dns", [
    ("https://127.0.0.1:6379/k?sig=1", None),  # the real resolver: IP literals
    ("https://[::ffff:127.0.0.1]/k", None),
    ("https://169.254.169.254/latest/meta-data", None),
    ("https://storage.internal/k", {"storage.internal": ["10.0.0.5"]}),
    ("https://rebind.example/k", {"rebind.example": ["52.216.0.1", "192.168.1.1"]}),
])
def test_a_presign_redirect_to_a_non_public_address_is_refused_unless_allowed(target, dns):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if "/presign/" in request.url.path:
            return httpx.Response(303, headers={"location": target})
        return httpx.Response(200, content=b"bytes")

    resolve = (lambda host, port: dns[host]) if dns else None
    host = httpx.URL(target).host
    f = ImageFetcher(FetchConfig(allowed_hosts=()), default_ls_url=LS, default_token="legacy",
                     transport=httpx.MockTransport(answer), resolve=resolve)
    with pytest.raises(InvalidRequestError, match="IMAGE_HOST_ALLOWLIST") as refused:
        f.fetch("s3://bucket/k.png", None, None, task_id=7)
    assert "sig=" not in str(refused.value) and seen == ["ls.example"]
    star = ImageFetcher(FetchConfig(allowed_hosts=("*",)), default_ls_url=LS,
                        default_token="legacy", transport=httpx.MockTransport(answer),
                        resolve=resolve)
    with pytest.raises(InvalidRequestError, match="not a public address"):  # `*` is no bypass
        star.fetch("s3://bucket/k.png", None, None, task_id=7)
    mine = ImageFetcher(FetchConfig(allowed_hosts=(host.lower(),)), default_ls_url=LS,
                        default_token="legacy", transport=httpx.MockTransport(answer),
                        resolve=resolve)
    assert mine.fetch("s3://bucket/k.png", None, None, task_id=7) == b"bytes"


def test_errors_never_show_a_presigned_url():
    def answer(request: httpx.Request) -> httpx.Response:
        if "/presign/" in request.url.path:
            return httpx.Response(303, headers={"location": "https://b.s3.example/k?X-Sig=secret"})
        return httpx.Response(403)

    f = ImageFetcher(FetchConfig(allowed_hosts=()), default_ls_url=LS, default_token="legacy",
                     transport=httpx.MockTransport(answer), resolve=PUBLIC_DNS)
    with pytest.raises(ImageFetchError, match="HTTP 403") as refused:
        f.fetch("s3://bucket/k.png", None, None, task_id=7)
    assert "secret" not in str(refused.value) and "presign" in str(refused.value)


def test_data_uris_are_decoded_within_the_size_limit():
    png = synthetic_png(40, 30)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    f = fetcher(FakeServer(), max_bytes=len(png))
    assert f.fetch(uri, None, None) == png
    assert decode_rgb(f.fetch(uri, None, None), max_pixels=10**6).shape == (30, 40, 3)
    with pytest.raises(InvalidRequestError, match="larger than"):
        fetcher(FakeServer(), max_bytes=len(png) - 1).fetch(uri, None, None)
    with pytest.raises(InvalidRequestError, match="cannot be decoded"):
        f.fetch("data:image/png;base64,@@@", None, None)


def test_exif_orientation_is_applied_as_browsers_show_the_image():
    """Stored 300 wide x 200 high with Orientation 6 (rotate 90 clockwise to display): the
    editor shows, and boxes are drawn on, a 200 x 300 image whose top row is the stored left
    column read bottom-up."""
    stored = np.zeros((200, 300, 3), np.uint8)
    stored[:, :10] = 255  # the stored left edge becomes the displayed top edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_rgb(buffer.getvalue(), max_pixels=10**6)
    assert rgb.shape == (300, 200, 3)
    assert rgb[:10].mean() > 200 and rgb[20:].mean() < 30
