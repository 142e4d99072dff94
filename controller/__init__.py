"""Controller: HTTP and gRPC APIs, deployments, router and queues, autoscaler, scheduler, state store."""
