"""Section 7 of the paper as a system under test (issue 14): noise schedules, and next the denoiser, its
training under Algorithm 2 and the checks D1-D4."""

from hcdiag.diffusion.schedules import KINDS, Schedule, family, parse_schedule

__all__ = ["KINDS", "Schedule", "family", "parse_schedule"]
