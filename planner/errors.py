"""The planner's one error type: raised on bad input, caught by the CLI as one line."""


class PlannerError(ValueError):
    """Bad planner input (model, profile, workload, trace, SLO); the message names the value."""
