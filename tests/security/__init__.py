"""Attack tests: each acts as a hostile user, server or backup would, on a real hub and real parts."""
