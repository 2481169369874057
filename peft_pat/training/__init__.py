"""Training glue around the tuner: the objective its forward computes (:mod:`.objective`), the schedule
driving and its telemetry (:mod:`.schedule`), the importance-aware start (:mod:`.calibration`).

Nothing is imported here, so the tuner can import each piece without a circle."""
