"""Drift monitoring on live traffic, and privacy-safe payload logging.

One module per concern (import them directly; this package imports nothing so
that ``models/config.py`` can use the config schema without a cycle):

* ``config``: the ``monitoring:`` block of a model's config.yaml;
* ``features``: how a tensor becomes per-row features (columns, channel means, classes);
* ``profile``: reference profiles (``reference_profile.json``): build, read, write, check;
* ``drift``: the statistics (PSI, KS, Wasserstein) as pure functions;
* ``window``: the sliding window of live feature values and its scoring;
* ``accumulator``: the bounded background worker that the request path hands data to;
* ``monitor``: :class:`~infergate.monitoring.monitor.DriftMonitor`, the per-version
  :class:`~infergate.monitoring.monitor.ModelMonitor` and ``load_monitor``;
* ``payload_log``: sampled requests and responses as JSON lines, redacted and hashed;
* ``readers``: sample files (.npy, .npz, .parquet, .csv) for ``infergate profile``;
* ``profiling``: the ``infergate profile`` command;
* ``metrics``: drift scores and alerts for the telemetry gauges;
* ``admin``: the ``DriftStatus`` admin RPC's response.
"""
