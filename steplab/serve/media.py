"""Images in chat requests: OpenAI ``image_url`` content parts -> pixels the model reads, with hard limits.

``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (PNG or JPEG, decoded by Pillow).
Every way a request can go wrong is a one-line 400 naming the part (``messages[i].content[j]``):
- a remote ``http(s)://`` URL, unless the server was started with remote images allowed;
- a malformed data URL, bad base64, a payload over ``MAX_IMAGE_BYTES``, bytes that are not a PNG/JPEG;
- more pixels than ``MAX_PIXELS``: checked from the header *before* decoding (a decompression bomb never
  allocates its pixels), and sides over ``MAX_SIDE``;
- more than ``MAX_IMAGES`` images in a request, or any image for a model that does not read images.

Decoded images are converted to RGB and resized to the model's square input (Pillow's bilinear filter;
an image already at that size is used as is), then placed at the model's place in their message (see
``steplab.data.images.insert_image_slots``).
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request

import numpy as np
import torch

from steplab.data.images import insert_image_slots, to_tensor
from steplab.serve.errors import APIError

MAX_IMAGES = 4
MAX_IMAGE_BYTES = 2_000_000  # decoded bytes of one image
MAX_PIXELS = 16_000_000  # width x height, read from the header before decoding
MAX_SIDE = 8192
# The chat route's body limit: the text routes' limit plus room for MAX_IMAGES base64 images (serve/gate.py).
def chat_request_bytes(text_limit: int) -> int:
    return text_limit + MAX_IMAGES * (MAX_IMAGE_BYTES * 4 // 3 + 64)


DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64,(.*)", re.DOTALL)


def _bad(message: str, param: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param=param, code=code)


def fetch_remote(url: str, param: str) -> bytes:
    """Download a remote image (only when the server allows it), at most MAX_IMAGE_BYTES, 10 s timeout."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (http/https only, checked by the caller)
            data = r.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as e:
        raise _bad(f"could not download the image at {param} ({type(e).__name__})", param) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(f"the image at {param} is over {MAX_IMAGE_BYTES} bytes", param, "image_too_large")
    return data


def image_bytes(url: str, param: str, allow_remote: bool) -> bytes:
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise _bad(f"remote image URLs are not allowed by this server ({param}); send the image inline as "
                       "data:image/png;base64,...", param, "remote_image_refused")
        return fetch_remote(url, param)
    m = DATA_URL.fullmatch(url)
    if m is None:
        raise _bad(f"{param}.image_url.url must be a data:image/png;base64 or data:image/jpeg;base64 URL", param)
    payload = m.group(2)
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise _bad(f"the image at {param} is over {MAX_IMAGE_BYTES} bytes", param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"the image at {param} is not valid base64", param) from None


def decode_image(data: bytes, param: str, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> (size, size, 3) uint8 RGB, refusing oversized images before their pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError):
        raise _bad(f"the data at {param} is not a PNG or JPEG image", param) from None
    except Image.DecompressionBombError:
        raise _bad(f"the image at {param} has too many pixels", param, "image_too_large") from None
    w, h = img.size
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE or min(w, h) < 1:
        raise _bad(f"the image at {param} is {w}x{h} pixels; the limit is {MAX_PIXELS:,} pixels and {MAX_SIDE} per side",
                   param, "image_too_large")
    try:
        img = img.convert("RGB")  # decodes
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img)
    except (OSError, ValueError, SyntaxError):
        raise _bad(f"the image at {param} is truncated or corrupt", param) from None


def chat_images(messages, image_size: int | None, allow_remote: bool = False) -> list[list[np.ndarray]]:
    """Per message, its decoded images (in order). ``image_size`` None: the model reads no images."""
    out, total = [], 0
    for i, m in enumerate(messages):
        found = []
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "image_url":
                continue
            param = f"messages[{i}].content[{j}]"
            total += 1
            if image_size is None:
                raise _bad(f"this model does not read images ({param}); send text only", param, "images_not_supported")
            if total > MAX_IMAGES:
                raise _bad(f"too many images: at most {MAX_IMAGES} per request", param, "too_many_images")
            if m.role != "user":
                raise _bad(f"images are accepted in user messages only ({param})", param)
            found.append(decode_image(image_bytes(part.image_url.url, param, allow_remote), param, image_size))
        out.append(found)
    return out


def image_prompt(tokenizer, prompt: list[int], per_message: list[list[np.ndarray]], n_tokens: int,
                 place: str = "start") -> tuple[list[int], torch.Tensor | None]:
    """The chat prompt with each message's image slots inserted at the model's ``place`` (``vision.image_place``),
    and the images as one (n, 3, H, W) tensor."""
    counts = [len(found) for found in per_message]
    if not any(counts):
        return prompt, None
    ids, _ = insert_image_slots(tokenizer, prompt, counts, n_tokens, place=place)
    return ids, torch.stack([to_tensor(p) for found in per_message for p in found])
