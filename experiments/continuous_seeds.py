r"""Prints a Markdown table over the seeds of continuous runs.

  python experiments/continuous_seeds.py WORKDIR [WORKDIR ...]

Each WORKDIR is a finished `--mode=continuous` run (one seed); see
`iat_jax.continuous.report.across_seeds` for what the columns are.
"""

import json
import os
import sys

from iat_jax.continuous import report


def main(workdirs: list[str]) -> None:
  results = []
  for w in workdirs:
    with open(os.path.join(w, "continuous", "results.json")) as f:
      results.append(json.load(f))
  print(report.seeds_markdown(report.across_seeds(results)))


if __name__ == "__main__":
  main(sys.argv[1:])
