"""Trace-driven discrete-event simulator driving the real scheduler and autoscaler."""
