"""Style images of the IP-Adapter: fetched on the event loop, read by the worker from a cache.

``ip_adapter_style_image_url`` is an http(s) URL or a ``data:image/...;base64,`` URL. Fetching
never runs on the worker thread: the engine awaits :meth:`StyleImages.resolve` (the transform's
``resolve_params`` hook) before the params reach the worker, which then reads the decoded image
from the cache by URL (:meth:`StyleImages.get`).

Bounds and refusals (each a pydantic ValidationError on ``ip_adapter_style_image_url``, a 422
that says why): more than ``max_bytes`` (too big), more than ``timeout_s`` or an HTTP error or a
redirect (unreachable: redirects are not followed, so none can lead to an address refused
here), content PIL cannot decode as an image or of more than ``MAX_PIXELS`` (not an image), and
a host that resolves to any private, loopback, link-local, reserved or multicast address (private
address) unless ``allow_private`` (tests serving an image from 127.0.0.1). The cache holds the
last ``size`` images by URL (thread-safe: the loop writes, the worker reads).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

import httpx
from PIL import Image as PILImage
from pydantic_core import ValidationError

FIELD = "ip_adapter_style_image_url"
#: Largest decoded style image (pixels): a bigger one is refused before it is decoded.
MAX_PIXELS = 40_000_000
DATA_PREFIX = "data:image/"


class StyleImageError(ValueError):
    """Why a style image URL is refused (the message of the 422)."""


class StyleImages:
    """Decoded style images (RGB PIL images) by URL, fetched within bounds (any thread)."""

    def __init__(
        self,
        *,
        max_bytes: int = 10_000_000,
        timeout_s: float = 10.0,
        allow_private: bool = False,
        size: int = 16,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self.size = size
        self._images: OrderedDict[str, PILImage.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> PILImage.Image | None:
        """The decoded image of ``url`` if it was fetched (and is still cached)."""
        with self._lock:
            image = self._images.get(url)
            if image is not None:
                self._images.move_to_end(url)
            return image

    async def resolve(self, url: str) -> PILImage.Image:
        """The image of ``url``, fetched and decoded unless cached (event loop); raises a
        ValidationError on ``ip_adapter_style_image_url`` naming why it is refused."""
        cached = self.get(url)
        if cached is not None:
            return cached
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await self._read(url)
            image = await asyncio.to_thread(decode_image, data)
        except TimeoutError:
            raise field_error(url, f"unreachable: no answer within {self.timeout_s:g} s") from None
        except StyleImageError as exc:
            raise field_error(url, str(exc)) from exc
        with self._lock:
            self._images[url] = image
            while len(self._images) > self.size:
                self._images.popitem(last=False)
        return image

    async def _read(self, url: str) -> bytes:
        if url.startswith("data:"):
            return read_data_url(url, self.max_bytes)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StyleImageError("give an http(s) URL or a data:image/...;base64, URL")
        if not self.allow_private:
            default_port = 443 if parts.scheme == "https" else 80
            await check_public(parts.hostname, parts.port or default_port)
        return await self._download(url)

    async def _download(self, url: str) -> bytes:
        try:
            async with (
                httpx.AsyncClient(follow_redirects=False) as client,
                client.stream("GET", url) as response,
            ):
                if response.is_redirect:
                    raise StyleImageError(
                        f"unreachable: answered {response.status_code} (a redirect; give the"
                        " image's own URL)"
                    )
                if response.status_code != 200:
                    raise StyleImageError(f"unreachable: answered {response.status_code}")
                return await self._body(response)
        except httpx.HTTPError as exc:
            raise StyleImageError(f"unreachable: {type(exc).__name__}: {exc}") from exc

    async def _body(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise StyleImageError(self._too_big())
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise StyleImageError(self._too_big())
        return bytes(body)

    def _too_big(self) -> str:
        return f"too big: more than {self.max_bytes} bytes"


def read_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL, at most ``max_bytes``."""
    head, _, payload = url.partition(",")
    if not head.startswith(DATA_PREFIX) or not head.endswith(";base64"):
        raise StyleImageError("not an image: a data URL must be data:image/...;base64,...")
    if len(payload) * 3 // 4 > max_bytes:
        raise StyleImageError(f"too big: more than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StyleImageError(f"not an image: bad base64 ({exc})") from exc


def decode_image(data: bytes) -> PILImage.Image:
    """``data`` decoded as an RGB image (raises StyleImageError when it is none)."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise StyleImageError(f"too big: {width}x{height} is over {MAX_PIXELS} pixels")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        if isinstance(exc, StyleImageError):
            raise
        raise StyleImageError(f"not an image: {exc}") from exc


async def check_public(host: str, port: int) -> None:
    """Refuse ``host`` when any address it resolves to is not a public one."""
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise StyleImageError(f"unreachable: {host!r} does not resolve ({exc})") from exc
    for _family, _type, _proto, _name, address in found:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise StyleImageError(
                f"private address: {host!r} resolves to {ip}, which is not a public address"
            )


def field_error(url: str, reason: str) -> ValidationError:
    """A 422 on ``ip_adapter_style_image_url`` saying ``reason`` (the URL is cut short)."""
    shown = url if len(url) <= 200 else url[:200] + "..."
    return ValidationError.from_exception_data(
        "DiffusionParams",
        [{"type": "value_error", "loc": (FIELD,), "input": shown, "ctx": {"error": reason}}],
    )
