"""Worker agent: gRPC service, model store (S3 -> disk -> DRAM), inference backends, heartbeats."""
