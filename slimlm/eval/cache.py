"""On-disk cache of the base model's reference outputs.

Keyed by the base model's identity (``slimlm.models.identity.model_id``:
source plus a fingerprint of its files), the protocol, a user's text hash
and the exact windows scored, so a second evaluation against the same base
does not recompute it. Files live in ``$SLIMLM_CACHE/base/`` as safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from slimlm.eval.quality import BaseStats
from slimlm.fsutil import atomic_write_bytes, cache_dir

log = logging.getLogger("slimlm.eval")


def cache_key(*, model_id: str, protocol: str, windows: torch.Tensor, top_k: int,
              text_sha256: str | None = None) -> str:
    """``text_sha256`` names a user's text (built-in protocol texts are named by ``protocol``)."""
    h = hashlib.sha256()
    ident = {"model": model_id, "protocol": protocol, "top_k": top_k}
    if text_sha256 is not None:  # absent for built-in texts, so their existing cache entries stay valid
        ident["text"] = text_sha256
    h.update(json.dumps(ident).encode())
    h.update(windows.to(torch.int64).numpy().tobytes())  # the exact tokens scored
    return h.hexdigest()[:24]


def _path(key: str) -> Path:
    return cache_dir() / "base" / f"{key}.safetensors"


def load_base_stats(key: str) -> BaseStats | None:
    path = _path(key)
    if not path.exists():
        return None
    try:
        t = load_file(str(path))
        return BaseStats(topk_idx=t["topk_idx"], topk_logp=t["topk_logp"], nll=t["nll"])
    except (SafetensorError, KeyError, OSError) as e:
        log.warning("ignoring unreadable base cache %s (%s); recomputing", path, e)
        return None


def store_base_stats(key: str, stats: BaseStats, *, meta: dict[str, str]) -> Path:
    tensors = {"topk_idx": stats.topk_idx.contiguous(), "topk_logp": stats.topk_logp.contiguous(), "nll": stats.nll}
    path = atomic_write_bytes(_path(key), save(tensors, metadata=meta))
    log.info("cached base outputs in %s", path)
    return path
