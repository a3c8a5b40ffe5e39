"""External routing data -> moegps types.

- :mod:`.deepseek_csv`: per-token DeepSeek-V2-Lite CSVs -> :class:`~moegps.trace.RoutingTrace`.
- :mod:`.olmoe_routing`: real Mixtral-8x7B / OLMoE aggregate counts -> :class:`~moegps.trace.ExpertLoads`
  and cross-layer / per-token-id count arrays (read through :mod:`moegps.safe_pickle`).
- :mod:`.reconstruct`: statistically reconstructed Mixtral-8x7B traces for any token stream.

Command line: ``python -m moegps.importers {deepseek-csv,olmoe-counts,reconstruct-mixtral} ...``.
"""
