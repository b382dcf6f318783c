"""Outbound delivery: relaying accepted mail to its next hops, and what decides them."""
