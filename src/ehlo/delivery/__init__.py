"""Outbound delivery: routing, the queue, the scheduler and the notices it sends."""
