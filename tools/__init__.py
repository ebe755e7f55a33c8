"""Tools around the pipeline, not stages of it.

- :mod:`tools.simulator`: the seeded app-store world behind ``widedeep simulate``, a source of
  impression logs with a known ground truth;
- :mod:`tools.experiment`: the paper's Table 1 experiment on the simulator (``bench/table1.py``).

Tools may use every package (they run the pipeline's stages); no stage imports a tool except
the CLI and ``widedeep run``, which simulate logs when none are given.
"""
