"""Sharded checkpoints (scaling.strategy=fsdp): every rank writes its own shards through DCP, straight to storage.

A sharded checkpoint is `<run>/checkpoint_<step>/` holding `shard_<rank>.safetensors` (that rank's pieces
of the model and optimizer state: raw tensors, readable without this package), `dcp.json` (where each
piece of each tensor lies: torch.distributed.checkpoint's metadata as JSON, so that nothing is
unpickled), `state.pt`, `rng.pt` and `job.yaml` as in a full checkpoint, and `manifest.json` (layout
"sharded", every file with its size and checksum: CRC-32 for the shards, sha256 for the rest), written
last by rank 0 once every rank's shards are
written. A restore reads of each shard only the byte ranges its rank needs (DCP reshards to any world
size), checking each piece read whole against its CRC-32 (cheap enough to leave the save's CPU to the
upload).
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from orchestrator import checkpoint as ckpt
from orchestrator import storage

DCP_METADATA = "dcp.json"
LAYOUT = "sharded"
MODEL_PREFIX = "model."


# A rank's pieces go to files of about this size: they upload side by side, and a ranged read of one costs
# a server that copies the whole object per request (moto does) no more than this.
SHARD_FILE_BYTES = 64 * 2**20


def shard_file_name(rank: int, index: int) -> str:
    """The `index`-th file of a rank's pieces."""
    return f"shard_{rank:05d}_{index:03d}.safetensors"


@dataclass
class ShardLocation:
    """Where one saved piece lies: its file, byte range, CRC-32, and its dtype and shape (tensors)."""

    file: str
    offset: int
    length: int
    crc32: int
    dtype: str | None = None  # None: pickled-free plain data (torch.save of lists, numbers, strings)
    shape: tuple[int, ...] = ()
    file_size: int = 0
    file_crc32: int = 0


# ----------------------------------------------------------------------------------------------
# Writing: one safetensors file per rank, then (coordinator) dcp.json and the commit


class ShardWriter(StorageWriter):
    """DCP's storage writer onto the run's storage: each rank's pieces as one safetensors file, under the retry policy.

    The coordinator's `finish` runs once every rank's write has returned: it hands the file table and
    dcp.json to `commit`, which writes rank 0's own files and the manifest last.
    """

    def __init__(
        self,
        fs,
        path: str,
        commit: Callable[[dict[str, dict[str, Any]], bytes], None],
        guard: Callable[[], None] | None = None,
    ):
        super().__init__()
        self.fs, self.path, self.commit, self.guard = fs, path, commit, guard
        self.rank = 0

    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = kwargs.get("rank") or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Before any rank writes (they wait for this plan): the run still holds its lease, and nothing of an
        # earlier attempt at this step stays, its manifest first so that it never vouches for files being replaced.
        if self.guard is not None:
            self.guard()
        manifest = storage.join(self.path, ckpt.MANIFEST)
        if storage.exists(self.fs, manifest):
            storage.call(self.fs, "rm_file", manifest)
        if storage.exists(self.fs, self.path):
            storage.call(self.fs, "rm", self.path, recursive=True)
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        pieces = []  # (item, tensor, plain data?): plain data (torch.save bytes) is kept as uint8
        for item in plan.items:
            data = planner.resolve_data(item)
            plain = isinstance(data, io.BytesIO)
            if plain:
                data = torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)
            pieces.append((item, data.detach().to("cpu").contiguous(), plain))
        files = {shard_file_name(self.rank, i): _file_of(group) for i, group in enumerate(_groups(pieces))}
        paths = {storage.join(self.path, name): blob for name, (blob, _) in files.items()}
        # Each file's CRC-32 taken while they upload, all at once (large ones in parallel parts): a shard file is
        # never read whole on a restore (each piece has its own CRC-32), and sha256 ran at a quarter of the pace.
        digests = storage.concurrently(
            [lambda blob=blob: zlib.crc32(blob) for blob, _ in files.values()]
            + [lambda: storage.write_files(self.fs, paths)],
            workers=len(files) + 1,
        )
        results = []
        for (name, (blob, located)), digest in zip(files.items(), digests[: len(files)], strict=True):
            for item, location in located:
                location.file, location.file_size, location.file_crc32 = name, len(blob), digest
                results.append(WriteResult(index=item.index, size_in_bytes=location.length, storage_data=location))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        locations = {r.index: r.storage_data for rank_results in results for r in rank_results}
        files = {
            loc.file: {"size": loc.file_size, "crc32": loc.file_crc32} for loc in locations.values() if loc.file_size
        }
        self.commit(files, encode_metadata(metadata, locations))

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def _groups(pieces: list) -> list[list]:
    """The rank's pieces in order, cut into runs of about SHARD_FILE_BYTES (a larger piece alone)."""
    groups: list[list] = []
    size = 0
    for piece in pieces:
        nbytes = piece[1].numel() * piece[1].element_size()
        if not groups or size + nbytes > SHARD_FILE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += nbytes
    return groups


def _file_of(group: list) -> tuple[bytes, list]:
    """One safetensors file of pieces, and where each lies in it (file name and checksum filled in by the caller).

    Written here rather than by safetensors.torch.save, which copies every tensor twice: the pieces'
    bytes are joined once behind the header, each CRC-32 taken from the tensor itself.
    """
    header: dict[str, Any] = {}
    views, located = [], []
    offset = 0
    for item, tensor, plain in group:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        header[_key(item.index)] = {
            "dtype": _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(view)],
        }
        location = ShardLocation(
            file="",
            offset=offset,
            length=len(view),
            crc32=zlib.crc32(view),
            dtype=None if plain else str(tensor.dtype).removeprefix("torch."),
            shape=tuple(tensor.shape),
        )
        views.append(view)
        located.append((item, location))
        offset += len(view)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
    for _, location in located:
        location.offset += 8 + len(head)
    return b"".join([len(head).to_bytes(8, "little"), head, *views]), located


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _key(index: MetadataIndex) -> str:
    """A piece's name in its rank's safetensors file: the state-dict key, and where the piece starts."""
    return index.fqn if index.offset is None else f"{index.fqn}@{','.join(map(str, index.offset))}"


def commit_sharded(
    fs,
    path: str,
    step: int,
    epoch: int,
    shard_files: dict[str, dict[str, Any]],
    dcp_json: bytes,
    own_files: dict[str, bytes],
    metrics: dict[str, Any],
    train: dict[str, Any] | None = None,
    guard: Callable[[], None] | None = None,
) -> str:
    """Rank 0, once every rank's shards are written: dcp.json and its own files, then the manifest listing all.

    `guard` (the run's lease check) runs again before the manifest: when it raises, nothing is committed.
    """
    files = {DCP_METADATA: dcp_json, **own_files}
    storage.write_files(fs, {storage.join(path, name): data for name, data in files.items()})
    entries = {name: {"size": len(data), "sha256": ckpt.sha256(data)} for name, data in files.items()}
    manifest = ckpt.CheckpointManifest(
        step=step, epoch=epoch, metrics=metrics, files={**shard_files, **entries}, train=train or {}, layout=LAYOUT
    )
    if guard is not None:
        guard()
    ckpt.write_manifest(fs, path, manifest)
    return path


# ----------------------------------------------------------------------------------------------
# dcp.json: DCP's metadata without pickle


def encode_metadata(metadata: Metadata, locations: dict[MetadataIndex, ShardLocation]) -> bytes:
    """DCP's Metadata and where each piece was written, as JSON."""
    by_fqn: dict[str, list[tuple[MetadataIndex, ShardLocation]]] = {}
    for index, loc in locations.items():
        by_fqn.setdefault(index.fqn, []).append((index, loc))
    entries: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        pieces = [
            {
                "offsets": list(index.offset) if index.offset is not None else None,
                **{k: getattr(loc, k) for k in ("file", "offset", "length", "crc32")},
                "shape": list(loc.shape),
            }
            for index, loc in by_fqn.get(fqn, [])
        ]
        if isinstance(md, TensorStorageMetadata):
            entries[fqn] = {
                "kind": "tensor",
                "dtype": str(md.properties.dtype).removeprefix("torch."),
                "requires_grad": md.properties.requires_grad,
                "size": list(md.size),
                "pieces": pieces,
            }
        else:
            entries[fqn] = {"kind": "bytes", "pieces": pieces}
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    return json.dumps({"format": 1, "entries": entries, "planner_data": planner}, indent=0).encode()


def decode_metadata(data: bytes) -> tuple[Metadata, dict[MetadataIndex, ShardLocation]]:
    """dcp.json back into DCP's Metadata (its storage_data the pieces' locations)."""
    raw = json.loads(data)
    state: dict[str, Any] = {}
    locations: dict[MetadataIndex, ShardLocation] = {}
    for fqn, e in raw["entries"].items():
        dtype = getattr(torch, e["dtype"]) if e["kind"] == "tensor" else None
        for p in e["pieces"]:
            offsets = torch.Size(p["offsets"]) if p["offsets"] is not None else None
            locations[MetadataIndex(fqn, offsets)] = ShardLocation(
                p["file"], p["offset"], p["length"], p["crc32"], e.get("dtype"), tuple(p["shape"])
            )
        if e["kind"] == "tensor":
            chunks = [
                ChunkStorageMetadata(offsets=torch.Size(p["offsets"]), sizes=torch.Size(p["shape"]))
                for p in e["pieces"]
            ]
            props = TensorProperties(dtype=dtype, requires_grad=e["requires_grad"])
            state[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(e["size"]), chunks=chunks)
        else:
            state[fqn] = BytesStorageMetadata()
    planner = {k: tuple(v) for k, v in raw.get("planner_data", {}).items()}
    return Metadata(state_dict_metadata=state, planner_data=planner, storage_data=locations), locations


# ----------------------------------------------------------------------------------------------
# Reading: the byte ranges a rank's load plan needs, several at once


class ShardReader(StorageReader):
    """DCP's storage reader from the run's storage: ranged reads of what this rank's plan needs; counts tensor bytes read."""

    def __init__(self, fs, info: ckpt.CheckpointInfo):
        super().__init__()
        self.fs, self.info = fs, info
        self.locations: dict[MetadataIndex, ShardLocation] = {}
        self.bytes_read = 0

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata, self.locations = decode_metadata(ckpt.read_verified(self.fs, self.info, [DCP_METADATA])[DCP_METADATA])
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.locations = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        wanted = []
        for req in plan.items:
            loc = self.locations[req.storage_index]
            if req.type == LoadItemType.BYTE_IO:
                wanted.append((req, loc, loc.offset, loc.length, True))
            else:
                start, length, whole = _byte_range(loc, req.storage_offsets, req.lengths)
                wanted.append((req, loc, start, length, whole))
        pieces = read_ranges(
            self.fs, self.info.path, [(loc.file, start, length) for _, loc, start, length, _ in wanted]
        )
        self.bytes_read += sum(len(p) for w, p in zip(wanted, pieces, strict=True) if w[1].dtype is not None)
        for (req, loc, _, _, whole), data in zip(wanted, pieces, strict=True):
            if whole and zlib.crc32(data) != loc.crc32:
                raise ValueError(f"{self.info.uri}/{loc.file}: {req.storage_index.fqn} does not match its CRC-32")
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(data))
                continue
            tensor = _tensor_of(data, loc.dtype, loc.shape if whole else (req.lengths[0], *loc.shape[1:]))
            if whole:
                tensor = tensor[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths, strict=True))]
            target = planner.resolve_tensor(req).detach()
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False


def _byte_range(loc: ShardLocation, offsets, lengths) -> tuple[int, int, bool]:
    """(start, length, whole) of the bytes holding a slice of a saved piece: rows of it when only dim 0 is cut."""
    shape = loc.shape
    if not shape or all(o == 0 and n == s for o, n, s in zip(offsets, lengths, shape, strict=True)):
        return loc.offset, loc.length, True
    if any(o != 0 or n != s for o, n, s in zip(offsets[1:], lengths[1:], shape[1:], strict=True)):
        return loc.offset, loc.length, True  # not a run of rows: the whole piece, sliced after
    row = loc.length // shape[0] if shape[0] else 0
    return loc.offset + offsets[0] * row, lengths[0] * row, False


def _tensor_of(data: bytes, dtype: str | None, shape) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    with warnings.catch_warnings():
        # The buffer is only read (its values are copied into the state dict), never written through.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=getattr(torch, dtype)).reshape(shape)


def read_ranges(fs, root: str, ranges: list[tuple[str, int, int]]) -> list[bytes]:
    """Byte ranges (file, start, length) of files under `root`, touching ranges merged, all fetched at once."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][:2])
    spans: list[list] = []  # [file, start, end, [indices]]
    for i in order:
        name, start, length = ranges[i]
        if spans and spans[-1][0] == name and start <= spans[-1][2]:
            spans[-1][2] = max(spans[-1][2], start + length)
            spans[-1][3].append(i)
        else:
            spans.append([name, start, start + length, [i]])
    parts = []  # large spans in parallel parts of storage.READ_PART_SIZE
    for name, start, end, _ in spans:
        for lo in range(start, max(end, start + 1), storage.READ_PART_SIZE):
            parts.append((name, lo, min(end, lo + storage.READ_PART_SIZE)))
    got = storage.concurrently(
        [lambda p=p: _read_part(fs, storage.join(root, p[0]), p[1], p[2]) for p in parts], storage.PARTS_IN_FLIGHT
    )
    by_part = dict(zip(parts, got, strict=True))
    out: list[bytes] = [b""] * len(ranges)
    for name, start, end, indices in spans:
        blob = b"".join(by_part[p] for p in parts if p[0] == name and start <= p[1] < max(end, start + 1))
        for i in indices:
            _, s, n = ranges[i]
            out[i] = blob[s - start : s - start + n]
    return out


def _read_part(fs, path: str, start: int, end: int) -> bytes:
    if end <= start:
        return b""
    data = storage.call(fs, "cat_file", path, start=start, end=end)
    if len(data) != end - start:
        raise ValueError(f"{storage.to_uri(fs, path)}: shorter than its manifest says (truncated)")
    return data


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but plain data (param groups, counters) loads with weights_only: nothing is unpickled."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ----------------------------------------------------------------------------------------------
# Whole tensors out of a sharded checkpoint: init_from, the test of the best, export


def read_metadata(fs, info: ckpt.CheckpointInfo) -> dict[str, Any]:
    """The entries of a sharded checkpoint's dcp.json, checked against its manifest."""
    return json.loads(ckpt.read_verified(fs, info, [DCP_METADATA])[DCP_METADATA])["entries"]


def read_full_weights(fs, info: ckpt.CheckpointInfo) -> dict[str, torch.Tensor]:
    """The model's whole tensors (names without the `model.` prefix) assembled from every rank's pieces."""
    entries = {k: e for k, e in read_metadata(fs, info).items() if k.startswith(MODEL_PREFIX) and e["kind"] == "tensor"}
    ranges = [(p["file"], p["offset"], p["length"]) for e in entries.values() for p in e["pieces"]]
    data = iter(read_ranges(fs, info.path, ranges))
    out = {}
    for fqn, e in entries.items():
        full = torch.empty(e["size"], dtype=getattr(torch, e["dtype"]))
        for p in e["pieces"]:
            piece = next(data)
            if zlib.crc32(piece) != p["crc32"]:
                raise ValueError(f"{info.uri}/{p['file']}: {fqn} does not match its CRC-32")
            region = tuple(slice(o, o + n) for o, n in zip(p["offsets"], p["shape"], strict=True))
            full[region] = _tensor_of(piece, e["dtype"], p["shape"])
        out[fqn.removeprefix(MODEL_PREFIX)] = full
    return out


_SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def export_weights(fs, info: ckpt.CheckpointInfo, path: str, metadata: dict[str, str] | None = None) -> int:
    """Write the model's weights of a sharded checkpoint to the local file `path` as one safetensors file; its size.

    A tensor at a time: pieces cut along dim 0 (FSDP's) follow each other in the file, so they are
    copied through, each checked against its CRC-32, and no whole model is ever built. `metadata` goes
    into the file's header (strings only).
    """
    entries = {k: e for k, e in read_metadata(fs, info).items() if k.startswith(MODEL_PREFIX) and e["kind"] == "tensor"}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for fqn, e in sorted(entries.items()):
        nbytes = math.prod(e["size"]) * torch.empty((), dtype=getattr(torch, e["dtype"])).element_size()
        header[fqn.removeprefix(MODEL_PREFIX)] = {
            "dtype": _SAFETENSORS_DTYPES[e["dtype"]],
            "shape": e["size"],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little") + head)
        for fqn, e in sorted(entries.items()):
            fh.write(_whole_tensor_bytes(fs, info, fqn, e))
    return 8 + len(head) + offset


def _whole_tensor_bytes(fs, info: ckpt.CheckpointInfo, fqn: str, e: dict[str, Any]) -> bytes:
    pieces = sorted(e["pieces"], key=lambda p: p["offsets"])
    data = read_ranges(fs, info.path, [(p["file"], p["offset"], p["length"]) for p in pieces])
    for p, piece in zip(pieces, data, strict=True):
        if zlib.crc32(piece) != p["crc32"]:
            raise ValueError(f"{info.uri}/{p['file']}: {fqn} does not match its CRC-32")
    rows_only = all(p["shape"][1:] == e["size"][1:] for p in pieces) and sum(
        p["shape"][0] if p["shape"] else 1 for p in pieces
    ) == (e["size"][0] if e["size"] else 1)
    if rows_only:
        return b"".join(data)
    full = torch.empty(e["size"], dtype=getattr(torch, e["dtype"]))
    for p, piece in zip(pieces, data, strict=True):
        full[tuple(slice(o, o + n) for o, n in zip(p["offsets"], p["shape"], strict=True))] = _tensor_of(
            piece, e["dtype"], p["shape"]
        )
    return full.contiguous().view(torch.uint8).numpy().tobytes()
