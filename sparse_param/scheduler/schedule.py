"""The schedule of topology updates: six validated numbers, and when they say to update.

Pure: nothing here knows a model or an optimizer. The engine asks an algorithm for the
interval in force at a step (DSR's doubles) and whether it also updates at ``stop``
(GMP reaches its final counts there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..arguments import check_int, check_real
from ..schedules import DROP_SCHEDULES
from ..schedules import drop_fraction as drop_fraction_at

FIELDS = ("total_steps", "update_interval", "drop_fraction", "drop_schedule", "stop", "start")


@dataclass(frozen=True)
class Schedule:
    """When a scheduler updates the topology, and how much it drops.

    Attributes:
        total_steps: optimizer steps of the whole run.
        update_interval: ΔT, optimizer steps between topology updates.
        drop_fraction: α, share of active weights dropped at an update, before decay.
        drop_schedule: decay of α, one of ``DROP_SCHEDULES``.
        stop: share of ``total_steps`` after which nothing updates (T_end).
        start: share of ``total_steps`` before which nothing updates.
    """

    total_steps: int
    update_interval: int
    drop_fraction: float
    drop_schedule: str
    stop: float
    start: float

    @classmethod
    def checked(cls, owner: str, values: Mapping[str, Any]) -> Schedule:
        """A schedule of ``values`` (keys :data:`FIELDS`), each validated and made a plain
        Python value; errors name ``owner``, the class the user called."""
        schedule = cls(
            total_steps=check_int(owner, "total_steps", values["total_steps"], 1),
            update_interval=check_int(owner, "update_interval", values["update_interval"], 1),
            drop_fraction=check_real(owner, "drop_fraction", values["drop_fraction"], 0, 1),
            drop_schedule=values["drop_schedule"],
            stop=check_real(owner, "stop (a share of total_steps)", values["stop"], 0, 1),
            start=check_real(owner, "start (a share of total_steps)", values["start"], 0, 1),
        )
        if schedule.drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"{owner}: unknown drop_schedule {schedule.drop_schedule!r}; expected one "
                f"of {DROP_SCHEDULES}"
            )
        if schedule.start > schedule.stop:
            raise ValueError(
                f"{owner}: start={schedule.start} is after stop={schedule.stop}; start "
                f"must be a share of total_steps in [0, stop]"
            )
        return schedule

    def changed(self, owner: str, **changes: Any) -> Schedule:
        """This schedule with ``changes``, validated as a whole."""
        return Schedule.checked(owner, vars(replace(self, **changes)))

    @property
    def start_step(self) -> int:
        return int(self.start * self.total_steps)

    @property
    def stop_step(self) -> int:
        return int(self.stop * self.total_steps)

    def drop_fraction_at(self, step: int) -> float:
        """α decayed to ``step``."""
        return drop_fraction_at(step, self.drop_fraction, self.stop_step, self.drop_schedule)

    def is_update_step(self, step: int, interval: int, at_stop: bool = False) -> bool:
        """Whether ``step`` updates, with ``interval`` the interval in force there;
        ``at_stop``: also at ``stop_step`` itself."""
        if at_stop and step == self.stop_step > self.start_step:
            return True
        return self.start_step < step <= self.stop_step and step % interval == 0

    def count_updates(self, is_update_step: Callable[[int], bool], limit: int | None) -> int:
        """Update steps over the run by ``is_update_step``, counting stops at ``limit``.
        They are among the multiples of ``update_interval`` and ``stop_step``."""
        candidates = range(
            (self.start_step // self.update_interval + 1) * self.update_interval,
            self.stop_step + 1,
            self.update_interval,
        )
        found = 0
        for step in candidates:
            found += is_update_step(step)
            if limit is not None and found >= limit:
                return found
        if self.stop_step % self.update_interval and is_update_step(self.stop_step):
            found += 1
        return found if limit is None else min(found, limit)


def schedule_attribute(name: str, doc: str) -> property:
    """A scheduler attribute backed by its :class:`Schedule`: reading returns the value;
    assigning validates the whole schedule with the new value, then re-derives what
    depends on it (``_set_schedule``); a bad value raises and changes nothing."""

    def get(self: Any) -> Any:
        return getattr(self.schedule, name)

    def set_(self: Any, value: Any) -> None:
        self._set_schedule(**{name: value})

    return property(get, set_, doc=doc)
