"""The RunPod emulator running pods as containers on the test stack's engine 1 (tests/runpod_emulator/conftest.py)."""

from tests.runpod_emulator.conftest import emulator  # noqa: F401 - a fixture
