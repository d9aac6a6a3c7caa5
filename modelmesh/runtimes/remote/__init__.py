"""Models that run in another process: a runtime server the mesh drives over gRPC.

``--runtime`` (``MM_RUNTIME``) says where models run (``RuntimeAddress``):

| value                | the server                                  | loader                      |
|----------------------|---------------------------------------------|-----------------------------|
| `embedded`           | none: models run in the mesh (default)      | ``EmbeddedLoader``          |
| `mmesh:HOST:PORT`,   | an ``mmesh.ModelRuntime`` + V2 server:      | ``ModelRuntimeLoader``      |
| `mmesh:unix:PATH`    | `modelmesh runtime`, any ModelMesh runtime  |                             |
| `mlserver:HOST:PORT` | MLServer, via the V2 model-repository API   | ``RepositoryRuntimeLoader`` |
| `triton:HOST:PORT`   | Triton (explicit model control), likewise   | ``RepositoryRuntimeLoader`` |

Both loaders are the cache's ``ModelLoader`` (synchronous, called in the
cache's threads) and return ``RemoteModel``s. A ``RemoteModel`` serves in two
ways: ``predict`` (tensors in, tensors out: encode, a V2 ``ModelInfer`` call,
decode), so anything that serves an embedded model serves it too, and
``infer_raw`` (serialized ``ModelInferRequest`` in, serialized response out),
which the data plane prefers (``passes_bytes``): the request bytes go to the
runtime untouched but for the model name (``modelmesh.wire.with_string_field``),
with the concrete model id in the ``mm-model-id`` header, as ModelMesh sends them.

``connect_runtime(settings)`` opens the connection at start-up, waits (at most
``--load-timeout``) for the runtime to be ready and returns a ``RuntimeBinding``:
the loader plus the limits the runtime reports (``runtimeStatus``: capacity,
loading concurrency, load timeout), which replace the mesh's own settings.

Sizes: an ``mmesh`` runtime measures each model (``loadModel``'s
``sizeInBytes``, else ``modelSize``) and predicts sizes (``predictModelSize``,
else its ``defaultModelSizeInBytes``). V2 servers report no sizes, so the
repository adapter uses the mesh's own prediction for the format (file size x
the format's factor, see each runtime's module; x ``UNKNOWN_FORMAT_FACTOR``
for formats the mesh does not know) both before and after the load.

A runtime that restarts forgets its models while the mesh still counts them
as loaded: a request that gets ``NOT_FOUND`` for a model the mesh loaded there
loads it again once and retries.

The modules: ``model`` (``RemoteModel`` and the loaders' shared base:
channels, naming, errors), ``spi`` (``ModelRuntimeLoader``, the
``mmesh.ModelRuntime`` client), ``repository`` (``RepositoryRuntimeLoader``
and the MLServer / Triton layouts), ``connect`` (``connect_runtime``,
``RuntimeBinding``).
"""

from modelmesh.runtimes.remote.connect import RuntimeBinding, connect_runtime
from modelmesh.runtimes.remote.model import RemoteLoader, RemoteModel
from modelmesh.runtimes.remote.repository import RepositoryRuntimeLoader
from modelmesh.runtimes.remote.spi import ModelRuntimeLoader
from modelmesh.settings import RuntimeAddress

__all__ = [
    "ModelRuntimeLoader",
    "RemoteLoader",
    "RemoteModel",
    "RepositoryRuntimeLoader",
    "RuntimeAddress",
    "RuntimeBinding",
    "connect_runtime",
]
