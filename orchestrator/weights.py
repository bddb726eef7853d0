"""A checkpoint's model weights as a whole, whatever its layout: init_from, evaluation, export.

Kept apart from checkpoint.py because a sharded checkpoint's weights are read by sharded_checkpoint, which
builds on checkpoint.py: this module sits above both, so neither imports the other back.
"""

from __future__ import annotations

import json

from orchestrator import storage
from orchestrator.checkpoint import (
    WEIGHTS,
    CheckpointInfo,
    deserialize_state,
    deserialize_weights,
    read_verified,
    resolve_checkpoint,
)
from orchestrator.errors import BadInput


def load_weights(uri: str, endpoint_url: str | None = None) -> dict:
    """Weights from a checkpoint/run URI, a .safetensors file or a torch state_dict file (weights_only)."""
    fs, path = storage.open_storage(uri, endpoint_url)
    try:
        is_file = fs.isfile(path)
    except Exception as exc:
        raise BadInput(storage.describe_error(uri, exc)) from None
    if is_file:
        data = storage.read_bytes(fs, path)
        if path.endswith(".safetensors"):
            return deserialize_weights(data)
        try:
            obj = deserialize_state(data)
        except Exception as exc:
            raise BadInput(f"{uri}: not a safetensors or weights-only state_dict file ({type(exc).__name__})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise BadInput(f"{uri}: holds no state_dict")
        return obj
    fs, info = resolve_checkpoint(uri, endpoint_url)
    try:
        return read_model_weights(fs, info)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def read_model_weights(fs, info: CheckpointInfo) -> dict:
    """The model's whole tensors of a committed checkpoint, full or sharded, checked against its manifest."""
    if info.manifest.layout == "sharded":
        from orchestrator.sharded_checkpoint import read_full_weights  # DCP's imports only when it is sharded

        return read_full_weights(fs, info)
    return deserialize_weights(read_verified(fs, info, [WEIGHTS])[WEIGHTS])


def with_metadata(data: bytes, metadata: dict[str, str]) -> tuple[bytes, memoryview]:
    """A safetensors file's new header (its `__metadata__` updated) and its unchanged tensor bytes, to write in turn.

    The tensors' offsets count from the end of the header, so a new header leaves them valid; it is padded with
    spaces to keep the tensors 8-byte aligned, as safetensors writes them.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, memoryview(data)[8 + length :]


def export_weights(fs, info: CheckpointInfo, path: str, metadata: dict[str, str] | None = None) -> int:
    """Write a checkpoint's verified weights to the local file `path` as one safetensors file; return its size.

    A sharded checkpoint's are streamed in a tensor at a time (sharded_checkpoint.export_weights).

    `metadata` goes into the file's header (strings only). ValueError when the weights do not match the manifest.
    """
    if info.manifest.layout == "sharded":
        from orchestrator.sharded_checkpoint import export_weights as export_sharded

        return export_sharded(fs, info, path, metadata or {})
    data = read_verified(fs, info, [WEIGHTS])[WEIGHTS]
    head, tensors = with_metadata(data, metadata or {})
    with open(path, "wb") as fh:
        fh.write(head)
        fh.write(tensors)
    return len(head) + len(tensors)
