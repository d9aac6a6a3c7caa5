"""TLS material (``tls``) and who may do what (``auth``): a leaf the transports and the
composition root use; it knows no transport beyond building gRPC / ssl credentials."""
