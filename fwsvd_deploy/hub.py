"""Whether the Hugging Face hub can be reached, asked once, so offline runs fail fast instead of retrying."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub endpoint does not accept a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_note() -> str:
    return "" if hub_reachable() else "; the Hugging Face hub is unreachable, so only local folders and caches work"
