"""V2 REST (with Triton's binary tensor extension) and KServe V1, on the V2 operations.

``RestApp`` translates HTTP requests (``tensors`` the bodies); ``RestServer``
serves it in the mesh's event loop.
"""

from modelmesh.rest.app import RestApp
from modelmesh.rest.server import RestServer

__all__ = ["RestApp", "RestServer"]
