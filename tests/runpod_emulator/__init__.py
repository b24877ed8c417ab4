"""An emulator of the RunPod GraphQL API for tests: pods run as real containers (see :mod:`.server`)."""
