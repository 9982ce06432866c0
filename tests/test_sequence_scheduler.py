"""The sequence scheduler end to end in one process: real onnxruntime sessions, real batcher.

Each test loads a stand-in of one of Triton's sequence models
(``tests/triton_models.py``) as a ``ModelVersion`` and drives a
``SequenceScheduler`` over it, the way the request handler will. Idleness is
timed by an injected clock that the tests move, never by sleeping; waits are
on observable state (slots in use, waiting starts).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import eventually
from triton_models import running_sum, stand_in

from infergate.errors import DeadlineExceeded, InvalidArgument, ModelExecutionError, QueueFull, Unavailable
from infergate.models.config import load_model_config
from infergate.models.sequence import SequenceParams, SequenceScheduler, load_initial_states
from infergate.models.version import ModelVersion, load_model_version

VALUES = [11, 7, 5, 3, 2, 0, 1]  # what Triton's example clients send after their first value


@dataclass
class Timer:
    when: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """A monotonic clock the test moves by hand, with the timers the scheduler sets on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[Timer] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        self.timers.append(Timer(self.now + delay, callback))
        return self.timers[-1]

    def advance(self, seconds: float) -> None:
        """Move on by ``seconds``, firing each timer passed on the way at its own time, earliest first."""
        end = self.now + seconds
        for _ in range(100):
            due = [t for t in self.timers if not t.cancelled and t.when <= end]
            if not due:
                self.now = end
                return
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback()
        raise AssertionError("a timer keeps setting itself again without time passing")


@dataclass
class Loaded:
    version: ModelVersion
    scheduler: SequenceScheduler
    clock: Clock

    async def send(self, sequence: int | str, value: int, *, start: bool = False, end: bool = False) -> int:
        inputs = {"INPUT": np.array([[value]], dtype=np.int32)}
        outputs = await self.scheduler.infer(SequenceParams(sequence, start, end), inputs)
        assert set(outputs) == {"OUTPUT"}, "state outputs stay on the server"
        return int(outputs["OUTPUT"][0, 0])

    async def sequence(self, sequence: int | str, values: list[int]) -> list[int]:
        """Send ``values`` as one sequence, each request after the previous answer."""
        last = len(values) - 1
        return [await self.send(sequence, v, start=i == 0, end=i == last) for i, v in enumerate(values)]


Load = Callable[..., Awaitable[Loaded]]


@pytest.fixture
async def load(tmp_path: Path) -> AsyncIterator[Load]:
    """Load a stand-in (optionally with another config.yaml) and wrap it in a scheduler.

    Idleness is timed by the test's ``Clock`` unless ``loop_clock`` asks for the
    event loop's own (for the idle timer, which the loop fires).
    """
    loaded: list[Loaded] = []

    async def _load(name: str, config_yaml: str | None = None, loop_clock: bool = False) -> Loaded:
        model = stand_in(name)
        directory = tmp_path / name
        (directory / "1").mkdir(parents=True)
        onnx.save_model(model.build(), str(directory / "1" / "model.onnx"))
        (directory / "config.yaml").write_text(config_yaml or model.config_yaml, encoding="utf-8")
        config = load_model_config(directory / "config.yaml")
        assert config.sequence_batching is not None
        version = await asyncio.to_thread(load_model_version, directory / "1", name, 1, config)
        version.start()
        clock = Clock()
        scheduler = SequenceScheduler(
            version.runner.spec,
            config.sequence_batching,
            version.infer,
            instances=version.runner.instance_count,
            initial_states=load_initial_states(config.sequence_batching, directory),
            clock=asyncio.get_running_loop().time if loop_clock else clock,
            call_later=None if loop_clock else clock.call_later,
        )
        loaded.append(Loaded(version, scheduler, clock))
        return loaded[-1]

    yield _load
    for item in loaded:
        await item.version.aclose()
        item.scheduler.close()


IMPLICIT = "simple_sequence_implicit"


# --------------------------------------------------------------------------- answers


async def test_four_concurrent_sequences_of_twenty_requests_each_get_their_running_sums(load: Load) -> None:
    model = await load(IMPLICIT)
    rng = np.random.default_rng(4)
    inputs = {seq: [int(v) for v in rng.integers(-50, 50, size=20)] for seq in (101, 102, "uuid-103", 104)}
    answers = await asyncio.gather(*(model.sequence(seq, values) for seq, values in inputs.items()))
    for (seq, values), got in zip(inputs.items(), answers, strict=True):
        assert got == running_sum(values), seq
    assert model.scheduler.active == 0, "every sequence ended and gave its slot back"


async def test_requests_of_different_sequences_share_batches_one_row_each(load: Load) -> None:
    model = await load(IMPLICIT)
    sequences = [1, 2, 3, 4]
    totals = dict.fromkeys(sequences, 0)
    for step in range(5):
        answers = await asyncio.gather(
            *(model.send(seq, seq * 10 + step, start=step == 0, end=step == 4) for seq in sequences)
        )
        for seq, got in zip(sequences, answers, strict=True):
            totals[seq] += seq * 10 + step
            assert got == totals[seq]
    stats = model.version.stats
    assert stats.inference_count == 20
    # All four arrive together; the first runs alone, the other three share the next batch.
    assert stats.execution_count < stats.inference_count


async def test_requests_fired_without_waiting_run_in_the_order_they_were_made(load: Load) -> None:
    model = await load(IMPLICIT)
    values = [5, -2, 9, 4, 4, -7, 1, 3]
    last = len(values) - 1
    calls = [asyncio.ensure_future(model.send(77, v, start=i == 0, end=i == last)) for i, v in enumerate(values)]
    assert await asyncio.gather(*calls) == running_sum(values)


async def test_simple_sequence_answers_as_triton_s_example_clients_expect(load: Load) -> None:
    model = await load("simple_sequence")
    string_id = str(uuid.uuid4())
    first, second, third = await asyncio.gather(
        model.sequence(1000, [0, *VALUES]),
        model.sequence(1001, [100, *(-v for v in VALUES)]),
        model.sequence(string_id, [20, *(-v for v in VALUES)]),
    )
    assert first == [1, *VALUES]  # READY * (INPUT + START)
    assert second == [101, *(-v for v in VALUES)]
    assert third == [21, *(-v for v in VALUES)]


async def test_dyna_sequence_adds_the_correlation_id_on_the_last_request(load: Load) -> None:
    model = await load("simple_dyna_sequence")
    first, second = await asyncio.gather(
        model.sequence(1000, [0, *VALUES]), model.sequence(1001, [100, *(-v for v in VALUES)])
    )
    assert first == [1, *VALUES[:-1], VALUES[-1] + 1000]
    assert second == [101, *(-v for v in VALUES[:-1]), -VALUES[-1] + 1001]


async def test_string_dyna_sequence_sums_its_inputs_and_adds_the_string_id_at_the_end(load: Load) -> None:
    model = await load("simple_string_dyna_sequence")
    values = [20, *(-v for v in VALUES)]
    expected = running_sum(values)
    expected[-1] += 1002
    assert await model.sequence("1002", values) == expected


# --------------------------------------------------------------------------- refusals


async def test_a_request_without_start_for_an_unknown_sequence_is_refused_in_triton_s_words(load: Load) -> None:
    model = await load(IMPLICIT)
    with pytest.raises(InvalidArgument) as refused:
        await model.send(5, 1)
    assert refused.value.message == (
        f"inference request for sequence 5 to model '{IMPLICIT}' must specify the START flag "
        "on the first request of the sequence"
    )


@pytest.mark.parametrize("params", [None, SequenceParams(0, start=True), SequenceParams("")])
async def test_a_request_without_a_correlation_id_is_refused(load: Load, params: SequenceParams | None) -> None:
    model = await load(IMPLICIT)
    with pytest.raises(InvalidArgument) as refused:
        await model.scheduler.infer(params, {"INPUT": np.array([[1]], dtype=np.int32)})
    assert refused.value.message == (
        f"inference request to model '{IMPLICIT}' must specify a non-zero or non-empty correlation ID"
    )


async def test_a_request_of_two_rows_is_refused(load: Load) -> None:
    model = await load(IMPLICIT)
    with pytest.raises(InvalidArgument, match="must specify batch-size 1 due to requirements of sequence batcher"):
        await model.scheduler.infer(SequenceParams(3, start=True), {"INPUT": np.array([[1], [2]], dtype=np.int32)})


async def test_an_integer_id_on_a_model_with_a_string_corrid_is_refused(load: Load) -> None:
    model = await load("simple_string_dyna_sequence")
    with pytest.raises(InvalidArgument) as refused:
        await model.send(1002, 1, start=True)
    assert refused.value.message == (
        "sequence batching control 'CORRID' data-type is 'UINT64', but model 'simple_string_dyna_sequence' "
        "expects 'BYTES'"
    )


async def test_after_its_end_a_sequence_needs_a_new_start_which_begins_afresh(load: Load) -> None:
    model = await load(IMPLICIT)
    assert await model.sequence(9, [4, 5]) == [4, 9]
    with pytest.raises(InvalidArgument, match="must specify the START flag"):
        await model.send(9, 1)
    assert await model.sequence(9, [1, 1]) == [1, 2]


async def test_a_start_in_the_middle_of_a_sequence_starts_it_over(load: Load) -> None:
    model = await load(IMPLICIT)
    assert await model.send(9, 10, start=True) == 10
    assert await model.send(9, 5) == 15
    assert await model.send(9, 1, start=True) == 1
    assert await model.send(9, 2, end=True) == 3
    assert model.scheduler.active == 0


async def test_a_failed_request_leaves_the_state_as_it_was(load: Load) -> None:
    model = await load(IMPLICIT)
    assert await model.send(9, 10, start=True) == 10
    with pytest.raises(ModelExecutionError):  # a shape the graph refuses: onnxruntime fails the run
        await model.scheduler.infer(SequenceParams(9), {"INPUT": np.array([[1, 2]], dtype=np.int32)})
    assert await model.send(9, 5, end=True) == 15


# --------------------------------------------------------------------------- idleness


async def test_an_idle_sequence_is_freed_and_its_next_request_is_refused_saying_why(load: Load) -> None:
    model = await load(IMPLICIT)  # max_sequence_idle_microseconds: 5000000
    assert await model.send(1, 3, start=True) == 3
    assert await model.send(2, 4, start=True) == 4
    model.clock.now += 4.0
    assert await model.send(2, 1) == 5  # sequence 2 stays busy, sequence 1 sits idle
    model.clock.now += 1.5
    assert model.scheduler.sweep() == 1
    assert model.scheduler.active == 1
    with pytest.raises(InvalidArgument) as refused:
        await model.send(1, 1)
    assert "must specify the START flag" in refused.value.message
    assert "idle for more than max_sequence_idle_microseconds=5000000 and was freed" in refused.value.message
    assert await model.send(2, 1, end=True) == 6


async def test_idle_sequences_are_freed_without_further_requests(load: Load) -> None:
    config = stand_in(IMPLICIT).config_yaml.replace("5000000", "1000")  # 1 ms
    model = await load(IMPLICIT, config, loop_clock=True)
    await model.send(1, 3, start=True)
    assert model.scheduler.active == 1
    await eventually(lambda: model.scheduler.active == 0, "the idle timer frees the sequence")


async def test_each_sequence_is_freed_when_its_own_idle_limit_passes(load: Load) -> None:
    model = await load(IMPLICIT, TWO_SLOTS)  # max_sequence_idle_microseconds: 5000000
    await model.send("a", 1, start=True)
    model.clock.advance(0.5)
    await model.send("b", 2, start=True)
    waiting = [asyncio.ensure_future(model.send(s, 3, start=True)) for s in ("c", "d")]
    await eventually(lambda: model.scheduler.backlog == 2, "c and d wait for a slot")
    model.clock.advance(4.6)  # a has been idle for 5.1 s
    assert model.scheduler.backlog == 1, "a was freed and c took its slot"
    model.clock.advance(0.5)  # b has been idle for 5.1 s
    assert model.scheduler.backlog == 0, "b was freed and d took its slot"
    assert await asyncio.gather(*waiting) == [3, 3]
    with pytest.raises(InvalidArgument, match="and was freed"):
        await model.send("b", 1)


# --------------------------------------------------------------------------- slots and backlog

ONE_SLOT = stand_in(IMPLICIT).config_yaml.replace("max_batch_size: 8", "max_batch_size: 1")
TWO_SLOTS = stand_in(IMPLICIT).config_yaml.replace("max_batch_size: 8", "max_batch_size: 2")


async def test_a_start_waits_for_a_free_slot_and_gets_the_one_an_ending_sequence_frees(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT)
    assert model.scheduler.capacity == 1
    assert await model.send("a", 1, start=True) == 1
    waiting = asyncio.ensure_future(model.sequence("b", [2, 3]))
    await eventually(lambda: model.scheduler.backlog == 1, "the second sequence waits for the slot")
    assert not waiting.done()
    assert await model.send("a", 1, end=True) == 2
    assert await waiting == [2, 5]
    assert (model.scheduler.active, model.scheduler.backlog) == (0, 0)


async def test_a_full_backlog_refuses_new_sequences(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT + "  max_backlog_sequences: 1\n")
    await model.send("a", 1, start=True)
    waiting = asyncio.ensure_future(model.send("b", 1, start=True))
    await eventually(lambda: model.scheduler.backlog == 1, "one sequence waits")
    with pytest.raises(QueueFull, match="all 1 sequence slots are in use and 1 sequences already wait"):
        await model.send("c", 1, start=True)
    await model.send("a", 1, end=True)
    assert await waiting == 1


async def test_a_start_whose_deadline_passes_in_the_backlog_is_refused_and_leaves_no_waiter(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT)
    await model.send("a", 1, start=True)
    deadline = asyncio.get_running_loop().time() + 0.05
    inputs = {"INPUT": np.array([[1]], dtype=np.int32)}
    with pytest.raises(DeadlineExceeded, match="waited for one of 1 sequence slots"):
        await model.scheduler.infer(SequenceParams("b", start=True), inputs, deadline)
    assert model.scheduler.backlog == 0
    await model.send("a", 1, end=True)
    assert model.scheduler.active == 0


async def test_a_cancelled_start_in_the_backlog_takes_no_slot(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT)
    await model.send("a", 1, start=True)
    waiting = asyncio.ensure_future(model.send("b", 1, start=True))
    await eventually(lambda: model.scheduler.backlog == 1, "b waits")
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await model.send("a", 1, end=True)
    assert (model.scheduler.active, model.scheduler.backlog) == (0, 0)
    assert await model.sequence("c", [7, 1]) == [7, 8]


async def test_closing_refuses_the_starts_still_waiting_for_a_slot(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT)
    await model.send("a", 1, start=True)
    waiting = asyncio.ensure_future(model.send("b", 1, start=True))
    await eventually(lambda: model.scheduler.backlog == 1, "b waits")
    model.scheduler.close()
    with pytest.raises(Unavailable, match="is unloading"):
        await waiting


async def test_draining_refuses_the_starts_waiting_for_a_slot_and_every_new_start(load: Load) -> None:
    model = await load(IMPLICIT, ONE_SLOT)
    await model.send("a", 1, start=True)
    waiting = asyncio.ensure_future(model.send("b", 1, start=True))
    await eventually(lambda: model.scheduler.backlog == 1, "b waits")
    model.scheduler.drain()
    with pytest.raises(Unavailable) as refused:
        await waiting
    assert refused.value.message == (
        f"the server is shutting down: model {IMPLICIT} starts no new sequences; "
        "retry the whole sequence, from its start request, on another replica"
    )
    with pytest.raises(Unavailable, match="the server is shutting down"):
        await model.send("c", 1, start=True)
    with pytest.raises(Unavailable, match="the server is shutting down"):
        await model.send("a", 1, start=True)  # a restart starts a sequence too
    assert model.scheduler.backlog == 0


async def test_a_draining_scheduler_serves_its_live_sequences_and_is_finished_once_they_end(load: Load) -> None:
    model = await load(IMPLICIT, TWO_SLOTS)
    await model.send("a", 1, start=True)
    await model.send("b", 10, start=True)
    model.scheduler.drain()
    finished = asyncio.ensure_future(model.scheduler.finished())
    assert await model.send("a", 2) == 3
    assert await model.send("a", 3, end=True) == 6
    assert not finished.done(), "b still holds its slot"
    model.clock.advance(5.1)  # b goes idle
    await eventually(finished.done, "finished once the last live sequence was freed")
    assert model.scheduler.active == 0


async def test_a_version_owns_its_scheduler_and_closing_the_version_drops_its_sequences(load: Load) -> None:
    model = await load(IMPLICIT)
    version = model.version
    assert version.sequences is not None
    assert [t.name for t in version.spec.inputs] == ["INPUT"], "clients see neither controls nor state"
    inputs = {"INPUT": np.array([[2]], dtype=np.int32)}
    assert (await version.sequences.infer(SequenceParams(9, start=True), inputs))["OUTPUT"][0, 0] == 2
    await version.aclose()
    with pytest.raises(Unavailable, match="is unloading: its sequences were dropped"):
        await version.sequences.infer(SequenceParams(9), inputs)
