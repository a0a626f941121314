"""Generated gRPC stubs (``make proto`` from protos/); never edit the ``*_pb2*`` files by hand."""
