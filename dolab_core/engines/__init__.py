"""Clients of the engines servers run on, shared by the backends that start servers there and the reapers that
remove what a crash left behind: :mod:`.docker` (Docker engines) and :mod:`.runpod` (the RunPod API)."""
