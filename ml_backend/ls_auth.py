"""Label Studio's tokens as the backend sends them: a legacy token as ``Authorization: Token
<key>``; a personal access token (a JWT refresh token) is exchanged at ``/api/token/refresh/``
for an access token sent as ``Authorization: Bearer <access>`` and cached until shortly before
it expires."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time

import httpx

from ml_backend.errors import ImageFetchError
from ml_backend.image_urls import join_ls_url

_ACCESS_TOKEN_MARGIN_S = 30.0


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
        url = join_ls_url(self._ls_url, "/api/token/refresh/")
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
