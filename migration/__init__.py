"""Live migration of in-flight requests between workers: protocol and cost model."""
