"""The Hugging Face Hub as this package sees it: the offline switches and a quick reachability probe.

Without network and without ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``, huggingface_hub, transformers and
datasets retry their requests for about a minute before failing. A run that needs something from the hub
asks :func:`hub_unreachable` first (one request, a few seconds at most) and fails at once with a clear error.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline(*variables: str) -> bool:
    """Whether any of the offline switches (default: ``HF_HUB_OFFLINE``) is on, as huggingface_hub reads it."""
    return any(os.environ.get(v, "").upper() in TRUE for v in variables or ("HF_HUB_OFFLINE",))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached (``None`` when it answers). Any HTTP answer, even an error status,
    counts as reachable; urllib honours the proxy variables as huggingface_hub does."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"{endpoint()} cannot be reached ({reason})"
    return None
