"""moegps: record MoE routing, predict it, place experts, and measure what that is worth."""

__version__ = "0.1.0"
