"""A request's images as the ingress hands them on: bytes, each with the request field it came from.

Nothing is decoded as an image here (the device tier does that, as the device would): data URLs are turned
into bytes, bounded, and refused with a 400 naming the field when the served models take text only or the URL
is one this deployment does not accept.
"""

from __future__ import annotations

from aiflow_ray.api.errors import ApiError
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.config.images import ImageLimits
from aiflow_ray.logging_utils import clip
from aiflow_ray.vision.decode import ImageInputError, RemoteImageRef, parse_image_url


def request_images(urls: list[str] | None, fields: list[str] | None, modalities: list[str],
                   limits: ImageLimits) -> tuple[ImageSource, ...]:
    """``urls`` as sent (native ``images`` or chat ``image_url`` parts); ``fields`` names each, else
    ``images[i]``."""
    if not urls:
        return ()
    names = fields or [f"images[{i}]" for i in range(len(urls))]
    if "image" not in modalities:
        raise ApiError(400, f"the served models take text only; {names[0]} is an image", names[0])
    if len(urls) > limits.max_images:
        raise ApiError(400, f"{len(urls)} images; at most {limits.max_images} per request", names[0])
    sources = []
    for name, url in zip(names, urls, strict=True):
        try:
            data = parse_image_url(url, name, limits)
        except ImageInputError as exc:
            raise ApiError(exc.status, str(exc), exc.field) from None
        if isinstance(data, RemoteImageRef):
            raise ApiError(400, f"{name}: fetching images from {clip(data.host)} is not supported by this "
                           "deployment; send a data URL", name)
        sources.append(ImageSource(data=data, field=name))
    return tuple(sources)
