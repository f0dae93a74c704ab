"""The engine: watch the files, read them, run the state machine, persist, publish on the bus."""
