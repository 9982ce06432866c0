"""A model's configuration file: infergate's ``config.yaml``, or Triton's ``config.pbtxt``.

A model directory copied from a Triton repository keeps its ``config.pbtxt``.
It is read with protobuf's text format against the part of Triton's
``ModelConfig`` infergate implements (proto/model_config.proto), then
translated as a RepositoryModelLoad JSON override is (``overrides.from_triton_json``)
and validated exactly as a config.yaml: a field infergate does not take is
refused naming the file and the line (``model_transaction_policy``,
``optimization.cuda``), never ignored. A directory with both files is
refused: which one applies would be a guess.

As in Triton, a config.pbtxt that writes ``max_batch_size: 0`` does not batch;
one that leaves it out gets infergate's default (64 when the graph's first
dimensions are symbolic, else 0), where Triton's auto-completed config picks 4.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format, text_format

from infergate._proto import model_config_pb2 as mc
from infergate.configfile import ConfigError
from infergate.models.config import ModelConfig, load_model_config, model_config_from_data
from infergate.models.overrides import from_triton_json

__all__ = ["CONFIG_PBTXT", "CONFIG_YAML", "config_file", "read_model_config"]

CONFIG_YAML = "config.yaml"
CONFIG_PBTXT = "config.pbtxt"


def config_file(directory: Path) -> Path:
    """The file that configures the model in ``directory``: its config.yaml, else its config.pbtxt,
    else (neither exists: every default) the config.yaml it would have."""
    yaml_path = directory / CONFIG_YAML
    pbtxt_path = directory / CONFIG_PBTXT
    return pbtxt_path if pbtxt_path.exists() and not yaml_path.exists() else yaml_path


def read_model_config(directory: Path) -> ModelConfig:
    """Read and validate the configuration of the model in ``directory``. Raises ConfigError naming the file."""
    yaml_path = directory / CONFIG_YAML
    pbtxt_path = directory / CONFIG_PBTXT
    if yaml_path.exists() and pbtxt_path.exists():
        raise ConfigError(f"{directory}: both {CONFIG_YAML} and {CONFIG_PBTXT}; keep one (infergate reads either)")
    if pbtxt_path.exists():
        return _from_pbtxt(pbtxt_path, directory.name)
    return load_model_config(yaml_path)


def _from_pbtxt(path: Path, model: str) -> ModelConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    message = mc.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:  # "3:1 : Message type ... has no field named ..."
        raise ConfigError(f"{path}: {exc} (docs/triton.md lists the fields infergate takes)") from None
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    try:
        translated = from_triton_json(model, data)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return model_config_from_data(translated, path)
