"""The pure core: credential states, events, formats, expiry, the state machine, redaction.

Nothing here reads a clock, touches a file or a socket, or imports the shell (the import
contract in ``pyproject.toml`` keeps it so): the engine passes in what it read and the time.
"""
