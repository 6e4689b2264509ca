"""Speculation-length controllers, one file each, looked up by name."""

from typing import Any

from specdecode.control.base import Controller, StepTimings
from specdecode.control.cost_aware import CostAwareController
from specdecode.control.fixed import FixedController
from specdecode.control.heuristic import HeuristicController
from specdecode.errors import SpecDecodeError

CONTROLLERS: dict[str, type[Controller]] = {
    cls.name: cls for cls in (FixedController, HeuristicController, CostAwareController)
}


def make_controller(name: str, initial: int, maximum: int, options: dict[str, Any]) -> Controller:
    try:
        cls = CONTROLLERS[name]
    except KeyError:
        known = ", ".join(sorted(CONTROLLERS))
        raise SpecDecodeError(f"unknown controller {name!r}; choose one of: {known}") from None
    try:
        return cls.create(initial, maximum, dict(options))
    except TypeError as exc:
        raise SpecDecodeError(f"bad options for controller {name!r}: {exc}") from None


__all__ = ["CONTROLLERS", "Controller", "StepTimings", "make_controller"]
