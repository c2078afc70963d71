"""The disk check counts the checkpoints the schedule will write, not keep_checkpoints blindly."""

from __future__ import annotations

import pytest

from crb.engine.checkpoint import bytes_needed
from crb.engine.schedule import Schedule
from crb.recipe.schema import TrainConfig

PARAMS = 1_000_000  # trainable: a checkpoint is 12 B each (fp32 weight + AdamW's two states), the final model 4 B


@pytest.mark.parametrize("save_every, keep, steps, per_epoch, copies", [
    (1_000_000, 3, 7, 7, 1),  # never saved on schedule: room for one stop-on-signal checkpoint only
    (1, 2, 7, 7, 3),  # saved every step: keep 2, and the new one while the oldest goes
    (5, 3, 7, 7, 2),  # one scheduled save, one stop
    (0, 5, 30, 10, 4),  # at each of 3 epoch ends, plus a stop
])
def test_bytes_needed_counts_the_checkpoints_the_schedule_writes(save_every, keep, steps, per_epoch, copies):
    t = TrainConfig(save_every=save_every, keep_checkpoints=keep, optimizer="adamw")
    need = bytes_needed(t, PARAMS, Schedule(1, 1, per_epoch, steps))
    assert need == PARAMS * (copies * 12 + 4)


def test_8bit_optimizer_states_take_two_bytes():
    t = TrainConfig(save_every=1, keep_checkpoints=1, optimizer="paged_adamw_8bit")
    assert bytes_needed(t, PARAMS, Schedule(1, 1, 4, 4)) == PARAMS * (2 * 6 + 4)


def test_no_checkpoints_need_room_for_the_final_weights_only():
    t = TrainConfig(save_every=1, keep_checkpoints=0, optimizer="adamw")
    assert bytes_needed(t, PARAMS, Schedule(1, 1, 4, 4)) == PARAMS * 4


def test_a_stop_with_no_checkpoints_saves_nothing(tmp_path):
    """keep_checkpoints = 0: a stop signal ends the run without writing (the accelerator is never asked)."""
    import signal

    from crb.engine.loop import stopped

    s = stopped(None, tmp_path / "checkpoints", 3, 0, {}, signal.SIGTERM, 0)  # type: ignore[arg-type]
    assert "no checkpoint" in str(s) and not (tmp_path / "checkpoints").exists()
