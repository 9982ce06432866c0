"""The ``monitoring:`` block of a model's config.yaml: drift monitoring and payload logging.

Both parts are off unless their block is present. Checked for coherence here,
at load of the config; whether the names it lists are the model's inputs or
outputs, and whether the reference profile exists and fits, is checked when a
version loads (:func:`infergate.monitoring.monitor.load_monitor`).

```yaml
monitoring:
  drift: {sample_fraction: 0.1, window: 2000, threshold: 0.2, method: psi}
  payload_log: {path: /var/log/infergate/fraud.jsonl, sample_fraction: 0.01, redact: [ssn], hash: [user_id]}
```
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from infergate.configfile import Strict

__all__ = ["DEFAULT_PROFILE_NAME", "DEFAULT_SALT_ENV", "DriftConfig", "Monitoring", "PayloadLogConfig"]

DEFAULT_PROFILE_NAME = "reference_profile.json"
DEFAULT_SALT_ENV = "INFERGATE_PAYLOAD_SALT"

Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
TensorName = Annotated[str, Field(min_length=1)]


class DriftConfig(Strict):
    """Compare a sample of live traffic with the version's reference profile."""

    # Share of requests whose inputs and outputs are handed to the background accumulator.
    sample_fraction: Fraction = 0.1
    # Rows in each feature's sliding window (the last ``window`` sampled rows).
    window: Annotated[int, Field(ge=10, le=1_000_000)] = 2000
    # A feature whose score is above this is drifting; the model is in alert while any is.
    threshold: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.2
    # How numeric features are scored; categorical ones always use psi.
    method: Literal["psi", "ks", "wasserstein"] = "psi"
    # No score until the window holds this many rows (None: the smaller of 500 and ``window``):
    # a nearly empty window is all noise.
    min_rows: Annotated[int, Field(ge=1)] | None = None
    # Scores are recomputed after this many sampled requests...
    update_every: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    # ...or this long after the last computation, whichever comes first (if anything new arrived).
    update_interval_seconds: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 10.0
    # Sampled requests waiting for the accumulator; when full, new ones are dropped (and counted).
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 256
    # The reference profile's file name in the version directory (written by ``infergate profile``).
    profile: Annotated[str, Field(min_length=1, pattern=r"^[^/\\]+$")] = DEFAULT_PROFILE_NAME

    @model_validator(mode="after")
    def _min_rows_fit(self) -> DriftConfig:
        if self.min_rows is not None and self.min_rows > self.window:
            raise ValueError(f"min_rows {self.min_rows} is larger than window {self.window}: no score would ever exist")
        return self

    @property
    def effective_min_rows(self) -> int:
        return self.min_rows if self.min_rows is not None else min(500, self.window)


class PayloadLogConfig(Strict):
    """Append a sample of requests and responses to a JSON-lines file, off the request path."""

    # The file; a relative path is relative to the server's working directory. Versions of one
    # model (and models naming the same path) share one writer.
    path: Annotated[str, Field(min_length=1)]
    sample_fraction: Fraction = 0.01
    # Inputs and outputs (by name; a name both an input and an output names both) whose values are never
    # written: replaced by "<redacted>". An output that echoes an input is written unless it is named too.
    redact: list[TensorName] = []
    # Inputs and outputs written as a keyed SHA-256 (HMAC) of each element, salted from ``salt_env``.
    hash: list[TensorName] = []
    # The environment variable holding the salt (never the salt itself: configs end up in git).
    salt_env: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = DEFAULT_SALT_ENV
    # A record longer than this (or than max_file_bytes, if smaller) keeps its metadata but not its tensor values.
    max_bytes_per_record: Annotated[int, Field(ge=256, le=64 * 1024 * 1024)] = 64 * 1024
    # Rotation: past this size the file becomes PATH.1 (PATH.1 becomes PATH.2, ...), ``backups`` kept.
    max_file_bytes: Annotated[int, Field(ge=1024)] = 100 * 1024 * 1024
    backups: Annotated[int, Field(ge=0, le=1000)] = 5
    # Records waiting for the writer; when full, new ones are dropped (and counted).
    queue_size: Annotated[int, Field(ge=1, le=100_000)] = 1024

    @model_validator(mode="after")
    def _disjoint(self) -> PayloadLogConfig:
        both = sorted(set(self.redact) & set(self.hash))
        if both:
            raise ValueError(f"tensors {both} are listed in both redact and hash; choose one")
        return self


class Monitoring(Strict):
    """Per model: drift monitoring and payload logging; both off when absent."""

    drift: DriftConfig | None = None
    payload_log: PayloadLogConfig | None = None
