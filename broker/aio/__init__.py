"""Async and OS building blocks that know nothing of credentials, shared by daemon and client.

A level-triggered wake-up, the event-stream shape, safe file reads, process groups and the
MQTT connect-with-fallback live here so that the consumer client can use them without
loading the engine.
"""
