"""Wire contracts: .proto files, generated gRPC stubs, and the typed Python client."""
