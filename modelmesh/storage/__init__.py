"""Where model files come from: the models root, or object storage through the disk cache.

``ModelFiles`` puts a model's files on local disk (the embedded loader in
``modelmesh.runtimes.loader`` loads them); ``check_model_location`` is what
registration validates with. URI forms are in ``uri``, the storage
configuration format in ``config``, pulling in ``puller``, the disk cache in
``diskcache``; ``paths`` holds client-given paths to the filesystem's rules and
every file a runtime opens to a ``FileScope`` (under the models root, regular,
not too large).
"""

from modelmesh.storage.config import StorageConfigs, StorageSpec, load_storage_config
from modelmesh.storage.diskcache import DiskCache
from modelmesh.storage.local import (
    LocalModel,
    ModelFiles,
    check_model_location,
    resolve_model_path,
)
from modelmesh.storage.paths import FileScope, check_path_text
from modelmesh.storage.puller import Puller, Source, resolve_source
from modelmesh.storage.uri import Location, parse_location

__all__ = [
    "DiskCache",
    "FileScope",
    "LocalModel",
    "ModelFiles",
    "Location",
    "Puller",
    "Source",
    "StorageConfigs",
    "StorageSpec",
    "check_model_location",
    "check_path_text",
    "load_storage_config",
    "parse_location",
    "resolve_model_path",
    "resolve_source",
]
