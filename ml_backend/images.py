"""Task images: URL resolution, Label Studio authentication, download cache and decoding.

URLs as Label Studio puts them in task data:

- ``/data/upload/<project>/<file>`` (uploaded) and ``/data/local-files/?d=<path>`` (local
  storage): relative to Label Studio, downloaded with its token;
- ``s3://``, ``gs://``, ``azure-blob://`` (cloud storage): resolved by Label Studio at
  ``/tasks/<id>/presign/?fileuri=<base64 URI>`` (the SDK's encoding), which redirects to a
  presigned URL;
- ``http(s)://``: downloaded directly; the token is sent only to Label Studio's own origin
  (same scheme, host and port);
- ``data:image/...;base64,...``: decoded in place, within the download size limit.

Any other scheme (``file://``, ``ftp://``, ...) is refused with :class:`InvalidRequestError` (400).

Which hosts (SSRF guard, :func:`check_image_url`): with ``FetchConfig.allowed_hosts`` set (the
workers set it from IMAGE_HOST_ALLOWLIST), an absolute http(s) URL is fetched only from Label
Studio's own host or a host of the allowlist (``*`` allows any); any other is refused with
:class:`InvalidRequestError` before a request is made. Redirects are followed by hand, up to
MAX_REDIRECTS, and every hop is checked the same way; the one exception is the redirect Label
Studio's own presign route (``/tasks/<id>/presign/``, ``/projects/<id>/presign/``, nothing else
holding ``/presign/``) answers for a cloud URI, which may lead to the storage's https host when
every address that host resolves to is public (a private one only when the allowlist names it).
A host admitted by ``*`` must resolve to public addresses too. Such hosts are connected to at the
address that was checked (the name kept in ``Host`` and TLS), so a second DNS answer cannot lead
elsewhere; through a proxy of the environment (HTTP(S)_PROXY) the proxy resolves the name again.
URLs holding a control character are refused.
The token goes only with requests to Label Studio's own origin. Relative URLs may not climb
out of their path (``..`` segments), and a local-files path (``/data/local-files/?d=<path>``) must
be relative to Label Studio's document root: absolute paths, ``..``, backslashes and NUL bytes are
refused before anything is requested. The backend never reads local files itself: Label Studio
serves them (and resolves symlinks against its own root).

Tokens: a legacy token is sent as ``Authorization: Token <key>``; a personal access token (a
JWT refresh token) is exchanged at ``/api/token/refresh/`` for an access token sent as
``Authorization: Bearer <access>`` and cached until shortly before it expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import httpx
import numpy as np
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri
from PIL import Image, ImageOps, UnidentifiedImageError

from ml_backend.errors import ImageFetchError, InvalidImageError, InvalidRequestError
from ml_backend.settings import Settings, url_origin
from talk2sam.bounded_cache import BoundedCache
from talk2sam.files import atomic_write_bytes

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
_ACCESS_TOKEN_MARGIN_S = 30.0
LOCAL_FILES_PATH = "/data/local-files"
MAX_REDIRECTS = 5
# Label Studio's presign routes, below its base path: the only hops whose redirect may leave
# Label Studio for a cloud storage host
PRESIGN_ROUTE = re.compile(r"/(?:tasks|projects)/\d+/presign/?")


def resolve_image_url(url: str, ls_url: str | None, task_id: int | None) -> str:
    """Absolute URL to download a task image from.

    Args:
        url: the image URL from task data.
        ls_url: Label Studio's base URL, or None.
        task_id: the task id (cloud storage URIs are resolved per task).

    Returns:
        An http(s) URL.

    Raises:
        ImageFetchError: when the URL needs Label Studio (relative or cloud) and none is known.
        InvalidRequestError: an unsupported scheme (``file://``, ...), or a control character
            (URL parsers drop some, so ``a\n.png`` would fetch ``a.png``, and refuse others).
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequestError(f"image URL {url[:80]!r} contains a control character")
    if url.startswith(("http://", "https://")):
        return url
    if url.startswith(CLOUD_SCHEMES):
        if task_id is None:
            raise ImageFetchError(f"cloud storage URL {url!r} needs a task id to be resolved")
        return _join(ls_url, f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}")
    if url.startswith("/"):
        return _join(ls_url, url)
    if url.startswith("upload/"):  # older exports store the upload key without /data
        return _join(ls_url, "/data/" + url)
    raise InvalidRequestError(
        f"unsupported image URL {url[:80]!r}: use http(s)://, a Label Studio path "
        f"(/data/upload/..., /data/local-files/?d=...), a cloud URI ({', '.join(CLOUD_SCHEMES)})"
        " or data:image/...;base64")


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded).

    Raises:
        InvalidRequestError: malformed, or larger than ``max_bytes`` once decoded.
    """
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise InvalidRequestError("data: image URI without a ',' before its payload")
    if len(payload) // 4 * 3 > max_bytes + 3:  # before decoding (base64 padding: +3)
        raise InvalidRequestError(f"data: image URI is larger than {max_bytes} bytes "
                                  "(MAX_IMAGE_DOWNLOAD_MB)")
    try:
        data = base64.b64decode(payload, validate=True) if header.endswith(";base64") \
            else unquote(payload).encode("latin-1")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise InvalidRequestError(f"data: image URI cannot be decoded: {exc}") from None
    if len(data) > max_bytes:
        raise InvalidRequestError(f"data: image URI is larger than {max_bytes} bytes "
                                  "(MAX_IMAGE_DOWNLOAD_MB)")
    return data


def check_image_url(url: str, absolute: str, ls_url: str | None,
                    allowed_hosts: tuple[str, ...] | None) -> None:
    """Refuse an image URL that could reach beyond Label Studio and the allowed hosts.

    Args:
        url: the image URL from task data.
        absolute: the URL :func:`resolve_image_url` made of it.
        ls_url: Label Studio's base URL, or None.
        allowed_hosts: hosts (``host`` or ``host:port``, lower case, ``*`` for any) that absolute
            URLs may name besides Label Studio's; None: no host restriction.

    Raises:
        InvalidRequestError: naming what is refused; nothing has been requested yet.
    """
    if not url.startswith(("http://", "https://")) and ".." in _segments(urlparse(url).path):
        raise InvalidRequestError(f"image URL {url!r} may not contain '..' path segments")
    parsed = urlparse(absolute)
    if parsed.path.rstrip("/") == LOCAL_FILES_PATH:
        _check_local_files_path(parse_qs(parsed.query).get("d", [""])[0], url)
    if ls_url and url_origin(absolute) == url_origin(ls_url):
        return
    host = (parsed.hostname or "").lower()
    if _allowed(host, url_origin(absolute)[2], allowed_hosts):
        return
    raise InvalidRequestError(
        f"image host {host or '?'!r} is neither Label Studio's nor in IMAGE_HOST_ALLOWLIST; "
        "add it there to allow downloads from it"
    )


def _segments(path: str) -> list[str]:
    return unquote(path).replace("\\", "/").split("/")


def _check_local_files_path(path: str, url: str) -> None:
    """A local-files ``d=`` path must stay under Label Studio's document root."""
    if not path or "\x00" in path or "\\" in path:
        raise InvalidRequestError(f"local-files URL {url!r} needs a relative path in 'd'")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in path.split("/"):
        raise InvalidRequestError(
            f"local-files path {path!r} must be relative to Label Studio's document root "
            "(no absolute path, no '..')"
        )


def _named(host: str, port: int | None, allowed_hosts: tuple[str, ...] | None) -> bool:
    """True when IMAGE_HOST_ALLOWLIST names host (or host:port) itself, or is None (no
    restriction): such a host is fetched by its name, whatever it resolves to."""
    return allowed_hosts is None or bool(host) and (
        host in allowed_hosts or f"{host}:{port}" in allowed_hosts)


def _allowed(host: str, port: int | None, allowed_hosts: tuple[str, ...] | None) -> bool:
    """True when IMAGE_HOST_ALLOWLIST admits host:port by name: it names it, or holds ``*``
    (then every address the host resolves to must be public too, checked at download)."""
    return _named(host, port, allowed_hosts) or "*" in (allowed_hosts or ())


def _is_presign_route(url: str, ls_url: str) -> bool:
    """True when ``url`` is Label Studio's own presign route (not a path merely holding it)."""
    base, path = urlparse(ls_url).path.rstrip("/"), urlparse(url).path
    return path.startswith(base) and PRESIGN_ROUTE.fullmatch(path[len(base):]) is not None


def _proxied(url: str) -> bool:
    """Whether httpx sends ``url`` through a proxy of the environment (HTTP(S)_PROXY)."""
    parsed = urlparse(url)
    return parsed.scheme in urllib.request.getproxies() and \
        not urllib.request.proxy_bypass(parsed.hostname or "")


def _addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is its own)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _join(ls_url: str | None, path: str) -> str:
    if not ls_url:
        raise ImageFetchError(
            f"image {path!r} is served by Label Studio but its URL is unknown: "
            "set LABEL_STUDIO_URL (or let Label Studio call /setup first)"
        )
    return urljoin(ls_url.rstrip("/") + "/", path.lstrip("/"))


def _jwt_claims(token: str) -> dict | None:
    """Claims of an unverified JWT, or None when ``token`` is not one (a legacy token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """Authorization header for one Label Studio and token; thread-safe.

    Args:
        ls_url: Label Studio's base URL.
        token: legacy token or personal access token (JWT refresh token).
        client: HTTP client used for the token exchange.
    """

    def __init__(self, ls_url: str, token: str, client: httpx.Client):
        self._ls_url = ls_url
        self._token = token
        self._client = client
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires_at = 0.0
        claims = _jwt_claims(token)
        self._kind = "legacy" if claims is None else claims.get("token_type", "access")

    def header(self, force_refresh: bool = False) -> dict[str, str]:
        """The ``Authorization`` header.

        Raises:
            ImageFetchError: when a personal access token cannot be exchanged.
        """
        if self._kind == "legacy":
            return {"Authorization": f"Token {self._token}"}
        if self._kind != "refresh":
            return {"Authorization": f"Bearer {self._token}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() >= self._access_expires_at:
                self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> None:
        url = _join(self._ls_url, "/api/token/refresh/")
        try:
            response = self._client.post(url, json={"refresh": self._token})
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot reach Label Studio to refresh the token: {exc}") from None
        if response.status_code != 200:
            raise ImageFetchError(
                f"Label Studio refused the personal access token at {url} "
                f"(HTTP {response.status_code}); check LABEL_STUDIO_API_KEY"
            )
        access = response.json().get("access") if response.headers.get(
            "content-type", "").startswith("application/json") else None
        if not isinstance(access, str) or not access:
            raise ImageFetchError(f"token refresh at {url} returned no access token")
        expires = (_jwt_claims(access) or {}).get("exp")
        self._access = access
        self._access_expires_at = (float(expires) - _ACCESS_TOKEN_MARGIN_S
                                   if isinstance(expires, (int, float)) else time.time() + 60)


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
        self._resolve = resolve or _addresses
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
                _is_presign_route(url, ls_url)
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
        if _named(host, port, self._config.allowed_hosts):
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
        if address is not None and _proxied(url):
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
