"""The RunPod emulator (records only) for the tests here that need one: tests/runpod_emulator/conftest.py's fixture."""

from tests.runpod_emulator.conftest import record_emulator

__all__ = ["record_emulator"]
