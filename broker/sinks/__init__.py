"""Delivery paths: each takes the engine's events from the bus to one kind of consumer."""
