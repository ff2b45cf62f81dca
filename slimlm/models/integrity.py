"""Checksums that turn a damaged or edited checkpoint into a one-line refusal instead of a wrong model.

A checkpoint written by this slimlm carries two digests:

* in the manifest, ``"sha256": {file: hex}`` for every safetensors file, so a flipped bit in the
  tensors (which still parse, and may even load) is caught;
* in the safetensors metadata of ``model.safetensors`` (or of the last shard), ``manifest_sha256``:
  the digest of the manifest without its ``sha256`` field, so an edited manifest (a module's type,
  scheme or sizes changed to ones the tensors happen to fit) is caught too.

Checkpoints written before these fields existed carry neither and load unverified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from slimlm.errors import SlimlmError

SHA256 = "sha256"  # the manifest's field: {file name: hex digest}
MANIFEST_SHA256 = "manifest_sha256"  # the safetensors metadata key


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """Digest of the manifest's content, its own ``sha256`` field left out (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint whose safetensors files differ from the digests its manifest records."""
    digests = manifest.get(SHA256, {})
    if not isinstance(digests, dict):
        raise SlimlmError(f"the manifest's {SHA256!r} field is not a mapping; the checkpoint is damaged: "
                          "compress again")  # fmt: skip
    for name, digest in digests.items():
        if Path(name).name != name:
            raise SlimlmError(f"the manifest lists {name!r}, which is not a file of {folder}; the checkpoint is "
                              "damaged: compress again")  # fmt: skip
        if not (folder / name).is_file():
            raise SlimlmError(f"{folder / name} is missing; the checkpoint is incomplete: compress again")
        if file_sha256(folder / name) != digest:
            raise SlimlmError(f"{folder / name} is corrupt or truncated (it does not match its manifest's "
                              "sha256); compress again")  # fmt: skip


def verify_manifest(weights: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest edited after ``weights`` (the file carrying ``manifest_sha256``) was written."""
    try:
        with safe_open(str(weights), "pt") as f:
            recorded = (f.metadata() or {}).get(MANIFEST_SHA256)
    except (SafetensorError, OSError) as e:
        raise SlimlmError(f"{weights} is corrupt or truncated ({str(e).splitlines()[0]}); compress again") from None
    if recorded is None:
        return  # written before manifests were sealed
    if SHA256 not in manifest:
        raise SlimlmError(f"the manifest of {weights.parent} lost its {SHA256!r} field; the checkpoint is damaged: "
                          "compress again")  # fmt: skip
    if recorded != manifest_sha256(manifest):
        raise SlimlmError(f"{weights.parent}'s manifest was changed after its tensors were written; the checkpoint is "
                          "damaged: compress again")  # fmt: skip
