"""Capacity planning (`terabrain plan`): memory and traffic per rank for every mesh, from the
learners' own counts and the data source table."""

from terabrain.capacity.planner import Plan, Split, configured_split, format_plan, plan_experiment
from terabrain.units import format_bytes, format_count, parse_memory

__all__ = ["Plan", "Split", "configured_split", "format_bytes", "format_count", "format_plan",
           "parse_memory", "plan_experiment"]
