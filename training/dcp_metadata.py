"""Reading a torch.distributed.checkpoint folder without running code from it.

DCP keeps a checkpoint's metadata in `<step>/.metadata` as a pickle, and its own `FileSystemReader`
unpickles it with `pickle.load`: a crafted `.metadata` in a folder a user or a Prefect API caller names
(`pretrain.train.init_from`, `distill.teacher_source`) would run any code as the user. `SafeReader`
reads the same file through an unpickler that admits only the classes DCP writes there; anything else
is refused with one line, before a single object of it is built.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pipelines.validation import UserInputError

METADATA_MODULE = "torch.distributed.checkpoint.metadata"
METADATA_CLASSES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "_MEM_FORMAT_ENCODING",
)
# What DCP's own metadata pickles reference besides its metadata classes (read off files it writes):
# plain values with constructors that run no code of the file's choosing.
OTHER_CLASSES = (
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
)
DTYPE_NAMES = tuple(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))
ALLOWED_CLASSES = frozenset(
    {(METADATA_MODULE, name) for name in METADATA_CLASSES}
    | set(OTHER_CLASSES)
    | {("torch", name) for name in DTYPE_NAMES}
)


class UnsafeCheckpointError(UserInputError):
    """A checkpoint's `.metadata` names something other than DCP metadata: it is not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_CLASSES:
            raise UnsafeCheckpointError(
                f"{self._path}: refused: it names {module}.{name}, which is not checkpoint metadata "
                "(loading it could run code); only torch.distributed.checkpoint folders that lvd or "
                "torch wrote load"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with the metadata read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Why the private path helper: it is how this torch version (pinned) names the metadata file.
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP checkpoint metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
