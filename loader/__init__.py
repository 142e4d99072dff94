"""Fast multi-tier loader: direct-I/O reader pool, DRAM pool, tensor materialization into a model."""
