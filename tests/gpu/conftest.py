"""GPU tests run several trainings in one process, at different precisions: each starts from a fresh Accelerate
state (the first run's mixed precision would otherwise stay and the next Accelerator refuse another)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
