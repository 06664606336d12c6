"""Task images: download (through :mod:`ml_backend.image_urls`' rules and
:mod:`ml_backend.ls_auth`'s tokens), a memory and disk cache, and decoding.

Redirects are followed by hand, up to MAX_REDIRECTS, every hop checked by
:func:`~ml_backend.image_urls.check_image_url`; a host admitted by ``*`` or reached through Label
Studio's presign route is connected to at the address that was checked. The token goes only with
requests to Label Studio's own origin.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ml_backend.errors import ImageFetchError, InvalidImageError, InvalidRequestError
from ml_backend.image_urls import (
    MAX_REDIRECTS,
    check_image_url,
    decode_data_uri,
    is_presign_route,
    named_by_allowlist,
    proxied,
    resolve_addresses,
    resolve_image_url,
)
from ml_backend.ls_auth import LabelStudioAuth
from ml_backend.settings import Settings, url_origin
from talk2sam.bounded_cache import BoundedCache
from talk2sam.files import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchConfig:
    """Download and decode limits (from ``Settings``)."""

    timeout_s: float = 20.0
    memory_cache_bytes: int = 256 * 2**20
    disk_cache_dir: str | None = None
    max_bytes: int = 512 * 2**20
    allowed_hosts: tuple[str, ...] | None = None  # None: any host (see check_image_url)


class ImageFetcher:
    """Downloads task images with the right credentials and caches the bytes by URL.

    Args:
        config: limits and cache locations.
        default_ls_url: Label Studio URL from the settings (wins over per-job ones).
        default_token: token from the settings, sent only to ``default_ls_url`` and
            ``trusted_ls_urls`` (there it wins over the one /setup handed over).
        trusted_ls_urls: further Label Studios the settings' token may go to
            (LABEL_STUDIO_ORIGINS).
        transport: optional httpx transport (tests).
        resolve: host, port -> addresses, as :func:`socket.getaddrinfo` (tests).
    """

    def __init__(
        self,
        config: FetchConfig,
        default_ls_url: str | None = None,
        default_token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        resolve: Callable[[str, int], list[str]] | None = None,
        trusted_ls_urls: tuple[str, ...] = (),
    ):
        self._config = config
        self._trusted = {url_origin(u) for u in (default_ls_url, *trusted_ls_urls) if u}
        self._resolve = resolve or resolve_addresses
        self._default_ls_url = default_ls_url
        self._default_token = default_token
        self._client = httpx.Client(timeout=config.timeout_s, follow_redirects=False,
                                    transport=transport)  # redirects: checked hop by hop
        # downloaded bytes by URL, least recently used out first (any number of images)
        self._memory = BoundedCache(max_items=1 << 30, max_bytes=config.memory_cache_bytes)
        self._auths: dict[tuple[str, str], LabelStudioAuth] = {}
        self._auth_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFetcher:
        """The fetcher of a worker or trainer process, with the limits of its settings."""
        return cls(FetchConfig(timeout_s=settings.image_fetch_timeout_s,
                               memory_cache_bytes=settings.image_download_cache_mb * 2**20,
                               disk_cache_dir=settings.image_download_dir,
                               max_bytes=settings.max_image_download_mb * 2**20,
                               allowed_hosts=settings.image_host_allowlist),
                   default_ls_url=settings.label_studio_url,
                   default_token=settings.label_studio_api_key,
                   trusted_ls_urls=settings.label_studio_origins)

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str, ls_url: str | None, token: str | None,
              task_id: int | None = None) -> bytes:
        """Bytes of a task image, from the cache or downloaded.

        Args:
            url: the image URL from task data.
            ls_url: Label Studio URL known to the caller (from /setup), used when the settings
                have none.
            token: token known to the caller (paired with ``ls_url``), used when the settings
                have none for that Label Studio.
            task_id: the task id, for cloud storage URIs.

        Raises:
            ImageFetchError: on a network error, an HTTP error status or a missing token.
            InvalidRequestError: when :func:`check_image_url` refuses the URL.
        """
        ls_url = self._default_ls_url or ls_url
        if ls_url and url_origin(ls_url) in self._trusted:  # never to a host /setup named
            token = self._default_token or token
        if url.startswith("data:"):
            return decode_data_uri(url, self._config.max_bytes)
        absolute = resolve_image_url(url, ls_url, task_id)
        check_image_url(url, absolute, ls_url, self._config.allowed_hosts)
        cache_key = hashlib.sha256(absolute.encode()).hexdigest()
        cached = self._memory.get(cache_key) or self._read_disk(cache_key)
        if cached is not None:
            self._remember(cache_key, cached)
            return cached
        data = self._download(absolute, ls_url, token)
        self._remember(cache_key, data)
        self._write_disk(cache_key, data)
        return data

    def _download(self, url: str, ls_url: str | None, token: str | None) -> bytes:
        """GET ``url``, following redirects by hand: every hop is checked like the first URL
        and only requests to Label Studio's own origin carry the token. Errors name the URL
        asked for, never a redirect's target (a presigned URL carries its signature)."""
        asked, presigned = url, False
        for _ in range(MAX_REDIRECTS + 1):
            auth = None
            if ls_url and url_origin(url) == url_origin(ls_url):
                if not token:
                    raise ImageFetchError(
                        f"{url} needs a Label Studio token: set LABEL_STUDIO_API_KEY "
                        "(or let Label Studio call /setup first)"
                    )
                auth = self._auth(ls_url, token)
                address = None
            else:
                address = self._address(url, asked, presigned)
            status, body, location = self._get(url, auth.header() if auth else {}, asked,
                                               address)
            if status == 401 and auth is not None:
                status, body, location = self._get(url, auth.header(force_refresh=True), asked)
            if location is None:
                break
            target = urljoin(url, location)
            if not target.startswith(("http://", "https://")):
                raise InvalidRequestError(f"{asked} redirects to an unsupported URL scheme")
            # Label Studio's presign route names the cloud storage's own host
            presigned = auth is not None and target.startswith("https://") and \
                is_presign_route(url, ls_url)
            if not presigned:
                check_image_url(target, target, ls_url, self._config.allowed_hosts)
            url = target
        else:
            raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects downloading {asked}")
        if status != 200:
            hint = " (check the token; personal access tokens need /api/token/refresh)" \
                if status in (401, 403) else ""
            raise ImageFetchError(f"downloading {asked} gave HTTP {status}{hint}")
        return body

    def _address(self, url: str, asked: str, presigned: bool) -> str | None:
        """Where to connect for a hop away from Label Studio: None, by name, for a host that
        IMAGE_HOST_ALLOWLIST names; else (``*``, or a presign redirect to the cloud storage) the
        host must resolve to public addresses only, and the first one is used, so that a second
        lookup cannot lead elsewhere (DNS rebinding). Errors name the host, never the URL (a
        presigned one carries its signature).

        Raises:
            InvalidRequestError: an address that is not public (loopback, private, link-local,
                reserved): the host must be named in IMAGE_HOST_ALLOWLIST to be fetched.
            ImageFetchError: the host does not resolve.
        """
        host, port = url_origin(url)[1:]
        if named_by_allowlist(host, port, self._config.allowed_hosts):
            return None
        what = "Label Studio's presign redirect names" if presigned else "the image host"
        try:
            addresses = self._resolve(host, port)
        except OSError as exc:
            raise ImageFetchError(f"{asked}: {what} {host}, which does not resolve: "
                                  f"{exc}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone index is no part
            if not ip.is_global:
                raise InvalidRequestError(
                    f"{asked}: {what} {host} ({ip}), which is not a public address; add the host "
                    "to IMAGE_HOST_ALLOWLIST if it is yours")
        if not addresses:
            raise ImageFetchError(f"{asked}: {what} {host}, which has no address")
        return addresses[0]

    def _get(self, url: str, headers: dict[str, str], asked: str, address: str | None = None
             ) -> tuple[int, bytes, str | None]:
        """(status, body, redirect location or None) of one GET, refusing bodies over
        ``max_bytes`` while they stream; errors name ``asked``."""
        extensions = {}
        if address is not None and proxied(url):
            address = None  # the proxy (HTTP(S)_PROXY) connects, by name: it cannot be pinned
        if address is not None:  # connect to the address checked; Host and TLS keep the name
            parsed = httpx.URL(url)
            # a connection kept by address could serve another name without its TLS check
            headers = {**headers, "Host": parsed.netloc.decode("ascii"), "Connection": "close"}
            if parsed.scheme == "https":
                extensions["sni_hostname"] = parsed.host
            url = str(parsed.copy_with(host=address.split("%")[0]))
        try:
            with self._client.stream("GET", url, headers=headers,
                                     extensions=extensions) as response:
                if response.is_redirect:
                    return response.status_code, b"", response.headers.get("location")
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self._config.max_bytes:
                        raise ImageFetchError(
                            f"{asked} is larger than {self._config.max_bytes} bytes "
                            "(MAX_IMAGE_DOWNLOAD_MB)")
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks), None
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot download {asked}: {type(exc).__name__}: "
                                  f"{str(exc).split('?')[0][:200]}") from None

    def _auth(self, ls_url: str, token: str) -> LabelStudioAuth:
        with self._auth_lock:
            key = (ls_url, token)
            if key not in self._auths:
                self._auths[key] = LabelStudioAuth(ls_url, token, self._client)
            return self._auths[key]

    def _remember(self, cache_key: str, data: bytes) -> None:
        if len(data) <= self._memory.max_bytes:  # a larger one would evict everything
            self._memory.put(cache_key, data, len(data))

    def _read_disk(self, cache_key: str) -> bytes | None:
        if not self._config.disk_cache_dir:
            return None
        try:
            with open(os.path.join(self._config.disk_cache_dir, cache_key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write_disk(self, cache_key: str, data: bytes) -> None:
        if not self._config.disk_cache_dir:
            return
        # atomic: concurrent workers never read half a file
        atomic_write_bytes(os.path.join(self._config.disk_cache_dir, cache_key), data,
                           durable=False)


def decode_rgb(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to RGB, EXIF orientation applied: Label Studio's editor shows the image
    as browsers do (oriented), so its boxes and sizes are in that frame.

    Args:
        data: encoded image (PNG, JPEG, WebP, ...).
        max_pixels: larger images are refused before decoding their pixels.

    Returns:
        (H, W, 3) uint8 RGB array.

    Raises:
        InvalidImageError: when the bytes are not a decodable image or it is too large.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"image of {width}x{height} pixels exceeds MAX_IMAGE_PIXELS={max_pixels}"
                )
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked on open
        raise InvalidImageError(f"image refused as a decompression bomb: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidImageError(f"image cannot be decoded: {exc}") from None
    return rgb
