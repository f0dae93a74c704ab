"""Workers that act on credentials: run a refresh command, ask a validator."""
