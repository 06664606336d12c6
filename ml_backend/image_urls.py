"""Task image URLs: how Label Studio writes them, where each leads, and which may be fetched.

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

Which hosts (SSRF guard, :func:`check_image_url`): with ``allowed_hosts`` set (the
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
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import urllib.request
from urllib.parse import parse_qs, unquote, urljoin, urlparse

from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

from ml_backend.errors import ImageFetchError, InvalidRequestError
from ml_backend.settings import url_origin

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
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
        return join_ls_url(ls_url, f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}")
    if url.startswith("/"):
        return join_ls_url(ls_url, url)
    if url.startswith("upload/"):  # older exports store the upload key without /data
        return join_ls_url(ls_url, "/data/" + url)
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


def named_by_allowlist(host: str, port: int | None, allowed_hosts: tuple[str, ...] | None) -> bool:
    """True when IMAGE_HOST_ALLOWLIST names host (or host:port) itself, or is None (no
    restriction): such a host is fetched by its name, whatever it resolves to."""
    return allowed_hosts is None or bool(host) and (
        host in allowed_hosts or f"{host}:{port}" in allowed_hosts)


def _allowed(host: str, port: int | None, allowed_hosts: tuple[str, ...] | None) -> bool:
    """True when IMAGE_HOST_ALLOWLIST admits host:port by name: it names it, or holds ``*``
    (then every address the host resolves to must be public too, checked at download)."""
    return named_by_allowlist(host, port, allowed_hosts) or "*" in (allowed_hosts or ())


def is_presign_route(url: str, ls_url: str) -> bool:
    """True when ``url`` is Label Studio's own presign route (not a path merely holding it)."""
    base, path = urlparse(ls_url).path.rstrip("/"), urlparse(url).path
    return path.startswith(base) and PRESIGN_ROUTE.fullmatch(path[len(base):]) is not None


def proxied(url: str) -> bool:
    """Whether httpx sends ``url`` through a proxy of the environment (HTTP(S)_PROXY)."""
    parsed = urlparse(url)
    return parsed.scheme in urllib.request.getproxies() and \
        not urllib.request.proxy_bypass(parsed.hostname or "")


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal is its own)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def join_ls_url(ls_url: str | None, path: str) -> str:
    if not ls_url:
        raise ImageFetchError(
            f"image {path!r} is served by Label Studio but its URL is unknown: "
            "set LABEL_STUDIO_URL (or let Label Studio call /setup first)"
        )
    return urljoin(ls_url.rstrip("/") + "/", path.lstrip("/"))
