"""The persisted database: one folder per DB. Nothing above this package reads or writes its
files."""

from .database import Database, LookupParts, StoredMaps
from .index import VectorIndex
from .info import DbInfo, describe
from .manifest import FORMAT_VERSION, ModelInfo, Shape
from .migrate import migrate
from .projector import Projector
from .segments import EntryTable, MapStore, SegmentWriter, StoreLayout, encode_entry
from .staging import scratch_folder, staging
from .templates import Templates

__all__ = [
    "FORMAT_VERSION",
    "Database",
    "LookupParts",
    "StoredMaps",
    "DbInfo",
    "EntryTable",
    "MapStore",
    "ModelInfo",
    "Projector",
    "SegmentWriter",
    "Shape",
    "StoreLayout",
    "Templates",
    "VectorIndex",
    "describe",
    "encode_entry",
    "migrate",
    "scratch_folder",
    "staging",
]
