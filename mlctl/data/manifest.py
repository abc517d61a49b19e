"""A shard folder's ``manifest.json`` at start-up: read it, and check that each shard it lists is
there as written, at the cost of one size lookup per shard (a ``stat``, or a HEAD of the object)
whatever the corpus size. A missing or resized shard is skipped and counted (``corrupt_shard``); a
local manifest without ``bytes``/``sha256`` (written by an older `mlctl prepare`) still loads, its
shards' tar headers read instead; in an object store such a manifest is refused (the scan would
read every object). Damage that keeps the size is found later, while streaming
(:mod:`mlctl.data.blocks`)."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from pathlib import Path

from mlctl import storage
from mlctl.data.shards import ShardRefused, scan_shard

log = logging.getLogger(__name__)


class CorruptShard(ValueError):
    """A shard whose bytes do not match what the manifest recorded."""


def read_manifest(root: str) -> dict:
    """The folder's manifest.json; a missing one says to run `mlctl prepare` first."""
    location = storage.join(root, "manifest.json")
    try:
        text = storage.read_text(location)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(
            f"no manifest.json in {storage.display(root)}: run `mlctl prepare` first "
            "(or it was interrupted before finishing)"
        ) from None
    return json.loads(text)


def check_manifest(root: str, manifest: dict) -> dict:
    """``{"valid": [(name, records, bytes, sha256), ...], "skipped": {reason: n}}`` for the shards
    ``manifest`` lists under ``root``: one size lookup per shard (a stat, or a HEAD of the object)
    for a current manifest, a tar header scan for the shards of an older one (no ``bytes``; local
    folders only). What no rank can train on is ``{"error": message}`` (``"refused": True`` for a
    shard with a forbidden member): returned, not raised, so rank 0 can hand it to every rank."""
    valid: list = []
    skipped: dict[str, int] = {}
    legacy = 0
    entries = manifest.get("shards")
    where = storage.display(storage.join(root, "manifest.json"))
    if not isinstance(entries, list):
        return {"error": f"{where}: key 'shards' must be a list of shards"}
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("samples"), int)
        ):
            return {
                "error": f"{where}: shards[{i}] needs a string 'name' and an integer 'samples', got {entry!r}"
            }
        location = storage.join(root, entry["name"])
        try:
            if isinstance(entry.get("bytes"), int):
                size = storage.size(location)
                if size != entry["bytes"]:
                    raise CorruptShard(f"{size} bytes, manifest says {entry['bytes']} (truncated?)")
                n, check = entry["samples"], (entry["bytes"], entry.get("sha256"))
            elif storage.is_remote(root):
                # NOTE: a header scan would read every object whole; prepare has written sizes
                # and checksums for long enough that an old manifest is re-made, not served.
                return {
                    "error": f"{where}: shards[{i}] has no 'bytes'/'sha256' (an older `mlctl "
                    "prepare`); shards in an object store need them: re-run `mlctl prepare`"
                }
            else:
                legacy += 1
                n = scan_shard(Path(location))
                if n != entry["samples"]:
                    raise tarfile.ReadError(f"{n} records, manifest says {entry['samples']}")
                check = (None, None)
        except ShardRefused as e:
            return {"error": str(e), "refused": True}
        except (tarfile.TarError, OSError, ValueError) as e:
            skipped["corrupt_shard"] = skipped.get("corrupt_shard", 0) + 1
            log.warning("skipping corrupt shard %s: %s", storage.display(location), e)
            continue
        valid.append((entry["name"], n, *check))
    if legacy:
        log.warning(
            "%s: %d shard(s) have no size/checksum in the manifest (an older `mlctl prepare`); "
            "their tar headers were read instead, which grows with the corpus: re-run prepare",
            storage.display(root),
            legacy,
        )
    return {"valid": valid, "skipped": skipped}


def manifest_hash(shards: str) -> str:
    """Hash of the shard folder's manifest.json (a local folder or an object-store URI): what a
    checkpoint records of the data it was trained on."""
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(shards, "manifest.json"))).hexdigest()[:16]
    except FileNotFoundError:
        return ""
