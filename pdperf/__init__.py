"""pdperf: the logic of the PD-disaggregation performance suite (fixtures and tests stay thin)."""

__version__ = "0.1.0"
