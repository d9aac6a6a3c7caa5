"""A multi-model serving mesh in the style of KServe ModelMesh.

Packages by concept: ``api`` (gRPC transports), ``routing``, ``cache`` (models
loaded here), ``runtimes`` (model formats), ``registry`` (etcd tables and their
mirror). ``instance.MeshInstance`` wires them together and owns their lifetime.
"""

__version__ = "0.1.0"
