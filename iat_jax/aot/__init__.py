"""Ahead-of-time compilation for the hardware a config targets (`--mode=compile`).

  targets  the chips and slices a config can be compiled for, and their
           compile-only devices;
  hlo      what a compiled step's HLO says: collectives, dot dtypes;
  compile  every pipeline stage's train and eval steps lowered and compiled
           for a target, the per-chip report and the fit check.
"""
