"""A request's images as the ingress hands them on: bytes, each with the request field it came from.

Nothing is decoded as an image here (the device tier does that, as the device would): data URLs are turned
into bytes, bounded, and refused with a 400 naming the field when the served models take text only or the URL
is one this deployment does not accept.

Remote images (``allow_remote_urls`` with a ``url_allow_list``) are fetched here, because the ingress stands
where the device's camera would: what crosses the device-edge link is the device tier's choice, never a URL the
edge would fetch itself. The fetch cannot be turned against other hosts or the server: only allow-listed hosts,
redirects followed by hand and re-checked against the list, no proxies or credentials from the environment, the
body streamed and cut at ``max_image_bytes``, and the whole fetch bounded by ``url_fetch_timeout_s``. Any
failure is a 400 (a 413 for size) naming the field, never a 5xx.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

import httpx

from aiflow_ray.api.errors import ApiError
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.config.images import ImageLimits
from aiflow_ray.logging_utils import clip
from aiflow_ray.vision.decode import ImageInputError, RemoteImageRef, parse_image_url

MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def request_images(urls: list[str] | None, fields: list[str] | None, modalities: list[str],
                         limits: ImageLimits, fetch: RemoteImages | None = None) -> tuple[ImageSource, ...]:
    """``urls`` as sent (native ``images`` or chat ``image_url`` parts); ``fields`` names each, else
    ``images[i]``. Remote URLs need ``fetch`` (the ingress's fetcher)."""
    if not urls:
        return ()
    names = fields or [f"images[{i}]" for i in range(len(urls))]
    if "image" not in modalities:
        raise ApiError(400, f"the served models take text only; {names[0]} is an image", names[0])
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images; at most {limits.max_images} per request", names[0])
    parsed: list[bytes | RemoteImageRef] = []
    for name, url in zip(names, urls, strict=True):
        try:
            parsed.append(parse_image_url(url, name, limits))
        except ImageInputError as exc:
            raise ApiError(exc.status, str(exc), exc.field) from None
    sources = []
    for name, data in zip(names, parsed, strict=True):
        if isinstance(data, RemoteImageRef):
            if fetch is None:
                raise ApiError(400, f"{name}: fetching images from {clip(data.host)} is not supported here; "
                               "send a data URL", name)
            data = await fetch.get(data, name)
        sources.append(ImageSource(data=data, field=name))
    return tuple(sources)


class RemoteImages:
    """Fetches allow-listed image URLs for one ingress (one connection pool, made on first use)."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def get(self, ref: RemoteImageRef, field: str) -> bytes:
        if self._client is None:
            # trust_env=False: no proxy, netrc or certificate settings from the server's environment.
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                             headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                                      "User-Agent": "aiflow-ray"})
        try:
            async with asyncio.timeout(self.limits.url_fetch_timeout_s):
                return await self._follow(ref, field)
        except TimeoutError:
            raise ApiError(400, f"{field}: the image at {clip(ref.host)} did not arrive within "
                                f"{self.limits.url_fetch_timeout_s:g} s", field) from None
        except httpx.HTTPError as exc:
            raise ApiError(400, f"{field}: the image at {clip(ref.host)} could not be fetched "
                                f"({type(exc).__name__})", field) from None

    async def _follow(self, ref: RemoteImageRef, field: str) -> bytes:
        assert self._client is not None
        for _ in range(MAX_REDIRECTS + 1):
            async with self._client.stream("GET", ref.url) as reply:
                if reply.status_code in _REDIRECTS and "location" in reply.headers:
                    target = urljoin(ref.url, reply.headers["location"])
                    try:
                        next_ref = parse_image_url(target, field, self.limits)
                    except ImageInputError as exc:
                        raise ApiError(exc.status, f"{field} redirects elsewhere: {exc}", field) from None
                    if not isinstance(next_ref, RemoteImageRef):  # a redirect to a data: URL
                        raise ApiError(400, f"{field} redirects to a non-http(s) URL", field)
                    ref = next_ref
                    continue
                if reply.status_code != 200:
                    raise ApiError(400, f"{field}: {clip(ref.host)} answered HTTP {reply.status_code} for the image",
                                   field)
                return await self._body(reply, field)
        raise ApiError(400, f"{field}: more than {MAX_REDIRECTS} redirects", field)

    async def _body(self, reply: httpx.Response, field: str) -> bytes:
        limit = self.limits.max_image_bytes
        declared = reply.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"{field} is {int(declared):,} bytes; at most {limit:,} are allowed", field)
        if reply.headers.get("content-encoding", "identity").strip().lower() not in ("identity", ""):
            raise ApiError(400, f"{field}: the image came with a content encoding, which was not asked for", field)
        chunks: list[bytes] = []
        size = 0
        # aiter_raw: counted as they arrive, with no decompression that could expand them past the limit.
        async for chunk in reply.aiter_raw():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{field} is over {limit:,} bytes; at most {limit:,} are allowed", field)
            chunks.append(chunk)
        return b"".join(chunks)
