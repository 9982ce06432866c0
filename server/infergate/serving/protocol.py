"""Protocol messages that describe models: metadata, configuration, statistics."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import json_format

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import model_config_pb2 as mc
from infergate.models.config import LatestPolicy, SequenceBatching, VersionPolicy, WarmupSample
from infergate.models.ensemble import EnsembleVersion
from infergate.models.governance import metadata_parameters
from infergate.models.overrides import graph_optimization, placement, session_parameters
from infergate.models.spec import ModelSpec, TensorSpec
from infergate.models.stats import Duration
from infergate.repository.catalog import ServedVersion

__all__ = [
    "model_config_message",
    "model_metadata_message",
    "model_statistics_message",
    "sequence_batching_message",
]


def model_metadata_message(spec: ModelSpec, versions: Iterable[int]) -> pb.ModelMetadataResponse:
    Tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=[str(v) for v in versions],
        platform=spec.platform,
        inputs=[Tensor(name=t.name, datatype=t.datatype.name, shape=t.shape) for t in spec.inputs],
        outputs=[Tensor(name=t.name, datatype=t.datatype.name, shape=t.shape) for t in spec.outputs],
    )


def _dims(t: TensorSpec, spec: ModelSpec) -> tuple[int, ...]:
    """Triton's config dims leave out the batch dimension."""
    return t.shape[1:] if spec.batches else t.shape


def model_config_message(model: ServedVersion) -> mc.ModelConfig:
    """The model's configuration in Triton's ModelConfig form (what perf_analyzer reads).

    A sequence model lists the tensors its clients send and get, not the control
    and state tensors the server fills; its scheduling is ``sequence_batching``.
    An ensemble's is ``ensemble_scheduling``, its steps.
    """
    if isinstance(model, EnsembleVersion):
        return _ensemble_config_message(model)
    spec, config = model.spec, model.config  # the spec clients see: without server-filled tensors
    formats = {i.name: i.format for i in config.input}
    labels = {o.name: o.label_filename or "" for o in config.output}
    group, optimization = placement(config.execution_providers, model.runner.providers[0])
    message = mc.ModelConfig(
        name=spec.name,
        platform=spec.platform,
        backend="onnxruntime",
        max_batch_size=spec.max_batch_size,
        version_policy=version_policy_message(config.version_policy),
        input=[
            mc.ModelInput(
                name=t.name, data_type=t.datatype.triton, dims=_dims(t, spec), format=formats.get(t.name, "FORMAT_NONE")
            )
            for t in spec.inputs
        ],
        output=[
            mc.ModelOutput(
                name=t.name, data_type=t.datatype.triton, dims=_dims(t, spec), label_filename=labels.get(t.name, "")
            )
            for t in spec.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{spec.name}_0",
                kind=group["kind"],
                gpus=group.get("gpus", []),
                count=model.runner.instance_count,
            )
        ],
        optimization=json_format.ParseDict(
            optimization | graph_optimization(config.session_options), mc.ModelOptimizationPolicy()
        ),
        default_model_filename=config.default_model_filename,
        # Governance metadata (owner, source_run, sha256…) and onnxruntime's thread options, as Triton's
        # string parameters (its onnxruntime backend's names for the latter).
        parameters={
            k: mc.ModelParameter(string_value=v)
            for k, v in (metadata_parameters(model.metadata) | session_parameters(config.session_options)).items()
        },
        model_warmup=[_warmup_message(sample) for sample in config.model_warmup],
        response_cache=mc.ModelResponseCache(enable=config.response_cache.enable),
    )
    if config.sequence_batching is not None:
        message.sequence_batching.CopyFrom(sequence_batching_message(config.sequence_batching))
    elif spec.batches:
        batching = config.dynamic_batching
        message.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_size,
                max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
                priority_levels=batching.priority_levels,
                default_priority_level=batching.default_priority_level,
                default_queue_policy=mc.ModelQueuePolicy(
                    max_queue_size=batching.max_queue_size,
                    default_timeout_microseconds=batching.default_timeout_microseconds,
                    allow_timeout_override=True,
                ),
            )
        )
    return message


def version_policy_message(policy: VersionPolicy) -> mc.ModelVersionPolicy:
    """config.yaml's ``version_policy`` as Triton's message: a config read back and sent to
    RepositoryModelLoad serves the same versions."""
    if policy.all is not None:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if policy.specific is not None:
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=policy.specific.versions))
    latest = policy.latest or LatestPolicy()
    return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=latest.num_versions))


def _ensemble_config_message(model: EnsembleVersion) -> mc.ModelConfig:
    spec, config = model.spec, model.config
    message = mc.ModelConfig(
        name=spec.name,
        platform=spec.platform,
        max_batch_size=spec.max_batch_size,
        version_policy=version_policy_message(config.version_policy),
        input=[mc.ModelInput(name=t.name, data_type=t.datatype.triton, dims=_dims(t, spec)) for t in spec.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=t.datatype.triton, dims=_dims(t, spec)) for t in spec.outputs],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in metadata_parameters(model.metadata).items()},
    )
    assert config.ensemble_scheduling is not None
    message.ensemble_scheduling.CopyFrom(
        json_format.ParseDict(config.ensemble_scheduling.model_dump(), mc.ModelEnsembling())
    )
    return message


def sequence_batching_message(block: SequenceBatching) -> mc.ModelSequenceBatching:
    """config.yaml's ``sequence_batching`` as Triton's message (its keys are Triton's field names)."""
    data = block.model_dump(exclude_none=True, exclude={"max_backlog_sequences"})
    data["max_sequence_idle_microseconds"] = round(block.idle_seconds * 1e6)  # 0 stands for Triton's default
    if block.direct is None and block.oldest is None:
        data["direct"] = {}  # Triton's default strategy, reported as such
    return json_format.ParseDict(data, mc.ModelSequenceBatching())


def _warmup_message(sample: WarmupSample) -> mc.ModelWarmup:
    return json_format.ParseDict(sample.model_dump(exclude_none=True), mc.ModelWarmup())


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics_message(model: ServedVersion) -> pb.ModelStatistics:
    s = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=_duration(s.cache_hit),
            cache_miss=_duration(s.cache_miss),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.by_batch_size.items())
        ],
    )
