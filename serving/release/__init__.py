"""The release gate (paper section 4.2): what a model passes before it reaches the servers.

- :mod:`serving.release.validate`: the dry run (the model loaded by a model server of its own
  process, sent its warmup requests and real eval examples, answers and latency checked) and
  the quality check against the baseline; writes the verdict;
- :mod:`serving.release.deploy`: copies a model with a passing, current verdict into a serving
  base path as the next version, atomically, and rolls back;
- :mod:`serving.release.server_client`: the one client of a model server the gate uses
  (version status polled with a deadline, Predict);
- :mod:`serving.release.server_process`: the one thing that starts a model server.
"""
