"""The train loop's own state: what a checkpoint must hold besides the weights, the optimizer, the scheduler,
the RNG and the rollouts (rollouts.py), so that a resumed run continues bitwise as if never stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite losses in a row, every judgement failed)."""


@dataclass
class TrainState:
    step: int = 0                        # steps trained
    policy_version: int = 0              # optimizer steps that changed the policy (staleness is counted in these)
    consecutive_nan: int = 0             # steps in a row skipped for a non-finite loss or gradient
    counters: dict[str, int] = field(default_factory=lambda: {"stale_dropped": 0, "nan_steps": 0})
    rewards: list[float] = field(default_factory=list)   # mean reward per trained step (the run's summary)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "policy_version": self.policy_version, "consecutive_nan": self.consecutive_nan,
                "counters": dict(self.counters), "rewards": list(self.rewards)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.policy_version, self.consecutive_nan = d["step"], d["policy_version"], d["consecutive_nan"]
        self.counters.update(d.get("counters", {}))
        self.rewards = list(d.get("rewards", []))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
