"""Where model files come from. Local files under the models root for now."""

from modelmesh.storage.local import LocalModelLoader, resolve_model_path

__all__ = ["LocalModelLoader", "resolve_model_path"]
