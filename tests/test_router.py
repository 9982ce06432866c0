"""The router: which loaded version serves a request that names none.

The router is pure logic over version numbers, so every test builds one from a
``Routing`` block and a list of loaded versions, seeds its random source, and
looks at the decisions. Statistical claims (a 90/10 split, a 25% shadow) are
checked over many decisions against a binomial tolerance of ``SDS`` standard
deviations; with a seeded generator and a stable hash the outcome is fixed, so
the tolerance only has to be right, never lucky.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from infergate.routing.config import CanaryRouting, Routing, ShadowRouting, StickyRouting
from infergate.routing.router import Decision, Router, RoutingError, check_routing, rendezvous

SEED = 20240601
DRAWS = 20_000  # decisions per statistical test
KEYS = [f"user-{i}" for i in range(5_000)]  # sticky keys per statistical test
SDS = 5.0  # binomial standard deviations a count may stray from its expectation

FAST = 0.010  # seconds: a primary's latency
SLOW = 0.030  # seconds: three times FAST


def within_binomial(count: int, trials: int, p: float) -> bool:
    """Whether ``count`` successes in ``trials`` is within ``SDS`` standard deviations of probability ``p``."""
    sd = math.sqrt(trials * p * (1 - p))
    return abs(count - trials * p) <= SDS * sd


def router(routing: Routing | None, loaded: list[int], seed: int = SEED) -> Router:
    return Router("toy", routing, loaded, rng=random.Random(seed))


def canary_router(steps: list[float], step_requests: int = 20, **limits: float) -> Router:
    """Versions 1 and 2 loaded; version 1 takes the primary traffic, version 2 is the canary."""
    canary = CanaryRouting(version=2, steps=steps, step_requests=step_requests, **limits)
    return router(Routing(weights={1: 100}, canary=canary), [1, 2])


def feed(r: Router, arm: str, count: int, *, ok: bool = True, latency_s: float = FAST) -> None:
    """Report ``count`` finished requests of ``arm`` to the router."""
    version = 2 if arm == "canary" else 1
    for _ in range(count):
        r.observe(Decision(version, arm), ok, latency_s)


# --------------------------------------------------------------------------- requested and default


@pytest.mark.parametrize(
    "routing",
    [
        pytest.param(None, id="no routing"),
        pytest.param(Routing(weights={1: 90, 2: 10}), id="weights"),
        pytest.param(Routing(weights={1: 100}, shadow=ShadowRouting(version=2, fraction=1.0)), id="always shadow"),
        pytest.param(Routing(weights={1: 100}, canary=CanaryRouting(version=2, steps=[100])), id="full canary"),
    ],
)
def test_a_requested_version_bypasses_the_split_and_is_never_shadowed(routing: Routing | None) -> None:
    r = router(routing, [1, 2, 3])
    for version in (1, 2, 3):
        for key in (None, "user-1"):
            assert r.route(requested=version, key=key) == Decision(version, "requested", None)


@pytest.mark.parametrize(
    ("loaded", "newest"),
    [([1], 1), ([1, 2, 3], 3), ([3, 1, 2], 3), ([7, 10, 9], 10)],
    ids=["one", "ordered", "unordered", "gaps"],
)
def test_without_weights_the_newest_version_serves_as_the_default(loaded: list[int], newest: int) -> None:
    r = router(Routing(), loaded)
    assert {r.route() for _ in range(100)} == {Decision(newest, "default")}
    assert r.route(key="user-1") == Decision(newest, "default")


def test_a_router_without_a_routing_block_behaves_as_an_empty_one() -> None:
    r = router(None, [1, 2])
    assert r.routing == Routing()
    assert r.route() == Decision(2, "default")
    assert (r.sticky_header, r.sticky_parameter, r.canary) == (None, None, None)


@pytest.mark.parametrize(
    ("routing", "loaded", "answering"),
    [
        pytest.param(Routing(), [1, 2, 3], (3,), id="the newest"),
        pytest.param(Routing(weights={1: 10, 2: 90}), [1, 2, 3], (2, 1), id="the weighted, largest first"),
        pytest.param(Routing(weights={1: 50, 2: 50, 3: 0}), [1, 2, 3], (2, 1), id="a tie: the newest first"),
        pytest.param(
            Routing(shadow=ShadowRouting(version=3, fraction=1.0)), [1, 2, 3], (2,), id="a shadow only gets copies"
        ),
        pytest.param(
            Routing(weights={1: 100}, canary=CanaryRouting(version=2, steps=[5])), [1, 2], (1, 2), id="and a canary"
        ),
    ],
)
def test_the_versions_that_may_answer_a_request_naming_none_start_with_the_primary(
    routing: Routing, loaded: list[int], answering: tuple[int, ...]
) -> None:
    """What an ensemble step at ``model_version: -1`` may run on (checked at load, see test_ensemble.py)."""
    r = router(routing, loaded)
    assert r.answering == answering
    assert r.primary == answering[0]


def test_a_router_needs_a_loaded_version() -> None:
    with pytest.raises(ValueError, match="at least one loaded version"):
        router(None, [])


# --------------------------------------------------------------------------- weighted split


@pytest.mark.parametrize(
    "weights",
    [
        pytest.param({1: 90, 2: 10}, id="90/10"),
        pytest.param({1: 50, 2: 50}, id="50/50"),
        pytest.param({1: 1, 2: 2, 3: 7}, id="three versions"),
        pytest.param({1: 0.3, 3: 0.7}, id="fractions, one loaded version left out"),
    ],
)
def test_the_weighted_split_is_honoured_within_statistical_tolerance(weights: dict[int, float]) -> None:
    r = router(Routing(weights=weights), [1, 2, 3])
    decisions = [r.route() for _ in range(DRAWS)]
    assert {d.arm for d in decisions} == {"split"}
    served = Counter(d.version for d in decisions)
    total = sum(weights.values())
    for version, weight in weights.items():
        assert within_binomial(served[version], DRAWS, weight / total), (version, served)
    assert set(served) <= set(weights)


def test_a_version_with_zero_weight_is_never_chosen() -> None:
    r = router(Routing(weights={1: 0, 2: 1, 3: 0}), [1, 2, 3])
    assert {r.route().version for _ in range(DRAWS)} == {2}
    assert {r.route(key=key).version for key in KEYS} == {2}


def test_the_same_seed_gives_the_same_decisions() -> None:
    routing = Routing(weights={1: 1, 2: 1}, shadow=ShadowRouting(version=3, fraction=0.5))
    first, second = router(routing, [1, 2, 3]), router(routing, [1, 2, 3])
    assert [first.route() for _ in range(1000)] == [second.route() for _ in range(1000)]


# --------------------------------------------------------------------------- sticky keys


STICKY = StickyRouting(header="x-user")


def test_a_sticky_key_always_gets_the_same_version_for_a_given_config() -> None:
    routing = Routing(weights={1: 60, 2: 30, 3: 10}, sticky=STICKY)
    r, rebuilt = router(routing, [1, 2, 3], seed=1), router(routing, [1, 2, 3], seed=2)
    for key in KEYS:
        first = r.route(key=key)
        assert first.arm == "sticky"
        assert all(r.route(key=key) == first for _ in range(4)), key
        assert rebuilt.route(key=key) == first, key  # another router (process) with the same config agrees


def test_sticky_keys_spread_over_the_versions_by_weight() -> None:
    weights = {1: 60.0, 2: 30.0, 3: 10.0}
    r = router(Routing(weights=weights, sticky=STICKY), [1, 2, 3])
    served = Counter(r.route(key=key).version for key in KEYS)
    for version, weight in weights.items():
        assert within_binomial(served[version], len(KEYS), weight / 100), (version, served)


def test_raising_a_weight_moves_keys_only_to_that_version_and_only_as_many_as_needed() -> None:
    before = router(Routing(weights={1: 90, 2: 10}, sticky=STICKY), [1, 2])
    after = router(Routing(weights={1: 80, 2: 20}, sticky=STICKY), [1, 2])
    moves = Counter((before.route(key=key).version, after.route(key=key).version) for key in KEYS)
    assert moves[(2, 1)] == 0  # nobody leaves the version whose weight grew
    assert within_binomial(moves[(1, 2)], len(KEYS), 0.20 - 0.10), moves


def test_sticky_routing_exposes_where_its_key_comes_from() -> None:
    by_header = router(Routing(weights={1: 1}, sticky=StickyRouting(header="x-user")), [1])
    by_parameter = router(Routing(weights={1: 1}, sticky=StickyRouting(parameter="user")), [1])
    assert (by_header.sticky_header, by_header.sticky_parameter) == ("x-user", None)
    assert (by_parameter.sticky_header, by_parameter.sticky_parameter) == (None, "user")


# --------------------------------------------------------------------------- rendezvous


@pytest.mark.parametrize(
    ("key", "weights", "version"),
    [
        pytest.param("alice", {7: 1}, 7, id="one version"),
        pytest.param("alice", {1: 0, 2: 5, 3: 0}, 2, id="only one positive weight"),
        pytest.param("alice", {1: 1, 2: 1, 3: 1}, 3, id="alice, equal thirds"),
        pytest.param("bob", {1: 1, 2: 1, 3: 1}, 1, id="bob, equal thirds"),
        pytest.param("erin", {1: 1, 2: 1, 3: 1}, 2, id="erin, equal thirds"),
        pytest.param("frank", {1: 1, 2: 1}, 2, id="frank, halves"),
        pytest.param("frank", {1: 90, 2: 10}, 1, id="frank, 90/10"),
        pytest.param("alice", {1: 90, 2: 10}, 2, id="alice, 90/10"),
    ],
)
def test_rendezvous_gives_a_stable_version_per_key(key: str, weights: dict[int, float], version: int) -> None:
    # Fixed answers: the hash is the same in every process and release, so sticky keys survive restarts.
    assert rendezvous(key, weights) == version


@pytest.mark.parametrize(
    ("weights", "equivalent"),
    [
        pytest.param({1: 90, 2: 10}, {2: 10, 1: 90}, id="order of the mapping"),
        pytest.param({1: 90, 2: 10}, {1: 9, 2: 1}, id="scale of the weights"),
        pytest.param({1: 90, 2: 10}, {1: 90, 2: 10, 3: 0}, id="a zero weight"),
    ],
)
def test_rendezvous_depends_only_on_the_relative_positive_weights(
    weights: dict[int, float], equivalent: dict[int, float]
) -> None:
    assert [rendezvous(key, weights) for key in KEYS] == [rendezvous(key, equivalent) for key in KEYS]


def test_rendezvous_never_chooses_a_version_without_weight() -> None:
    assert {rendezvous(key, {1: 0, 2: 3, 3: 0, 4: 1}) for key in KEYS} == {2, 4}


# --------------------------------------------------------------------------- shadow


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_the_shadow_fraction_is_honoured_within_statistical_tolerance(fraction: float) -> None:
    r = router(Routing(weights={1: 100}, shadow=ShadowRouting(version=2, fraction=fraction)), [1, 2])
    decisions = [r.route() for _ in range(DRAWS)]
    shadowed = sum(d.shadow is not None for d in decisions)
    assert within_binomial(shadowed, DRAWS, fraction), shadowed
    assert {d.shadow for d in decisions} <= {None, 2}
    assert {d.version for d in decisions} == {1}


@pytest.mark.parametrize(
    ("routing", "loaded"),
    [
        pytest.param(Routing(weights={1: 1, 2: 1}, shadow=ShadowRouting(version=3)), [1, 2, 3], id="weights"),
        pytest.param(Routing(shadow=ShadowRouting(version=1)), [1, 2], id="default, older shadow"),
        pytest.param(Routing(shadow=ShadowRouting(version=2)), [1, 2], id="default, newest shadow"),
        pytest.param(
            Routing(weights={1: 1}, shadow=ShadowRouting(version=3), canary=CanaryRouting(version=2, steps=[50])),
            [1, 2, 3],
            id="canary",
        ),
    ],
)
def test_a_request_is_never_shadowed_to_the_version_that_served_it(routing: Routing, loaded: list[int]) -> None:
    r = router(routing, loaded)
    for key in (None, *KEYS[:100]):
        for _ in range(20):
            decision = r.route(key=key)
            assert decision.shadow != decision.version, decision


@pytest.mark.parametrize(
    ("routing", "loaded"),
    [
        pytest.param(Routing(weights={1: 1, 2: 1}, shadow=ShadowRouting(version=3)), [1, 2, 3], id="weights"),
        pytest.param(Routing(shadow=ShadowRouting(version=1)), [1, 2], id="default, older shadow"),
        pytest.param(Routing(shadow=ShadowRouting(version=2)), [1, 2], id="default, newest shadow"),
    ],
)
def test_the_shadow_version_never_answers_a_routed_request(routing: Routing, loaded: list[int]) -> None:
    # ShadowRouting: "its answers are compared, never returned".
    assert routing.shadow is not None
    r = router(routing, loaded)
    served = {r.route(key=key).version for key in (None, *KEYS[:100]) for _ in range(20)}
    assert routing.shadow.version not in served, served


# --------------------------------------------------------------------------- canary: traffic


@pytest.mark.parametrize("weight", [5.0, 10.0, 50.0])
def test_the_canary_takes_its_step_weight_of_the_traffic(weight: float) -> None:
    r = canary_router(steps=[weight])
    decisions = [r.route() for _ in range(DRAWS)]
    canary = [d for d in decisions if d.arm == "canary"]
    assert within_binomial(len(canary), DRAWS, weight / 100), len(canary)
    assert {d.version for d in canary} == {2}
    assert {(d.version, d.arm) for d in decisions if d.arm != "canary"} == {(1, "split")}


def test_a_canary_at_100_percent_takes_all_the_traffic() -> None:
    r = canary_router(steps=[100])
    assert {r.route() for _ in range(1000)} == {Decision(2, "canary")}


def test_the_canary_takes_only_its_step_weight_when_it_is_the_newest_version_and_there_are_no_weights() -> None:
    # The usual roll-out: version 1 serves, version 2 arrives as a canary at 10%.
    r = router(Routing(canary=CanaryRouting(version=2, steps=[10])), [1, 2])
    served = Counter(r.route().version for _ in range(DRAWS))
    assert within_binomial(served[2], DRAWS, 0.10), served


def test_a_sticky_key_with_a_canary_is_deterministic() -> None:
    routing = Routing(weights={1: 100}, sticky=STICKY, canary=CanaryRouting(version=2, steps=[30]))
    r, rebuilt = router(routing, [1, 2], seed=1), router(routing, [1, 2], seed=2)
    decisions = {}
    for key in KEYS:
        first = r.route(key=key)
        assert all(r.route(key=key) == first for _ in range(4)), key
        assert rebuilt.route(key=key) == first, key
        decisions[key] = first
    canary = sum(d.arm == "canary" for d in decisions.values())
    assert within_binomial(canary, len(KEYS), 0.30), canary
    assert {(d.version, d.arm) for d in decisions.values()} == {(2, "canary"), (1, "sticky")}


def test_a_sticky_key_in_the_canary_stays_there_as_the_canary_grows() -> None:
    canary = CanaryRouting(version=2, steps=[10, 40], step_requests=20)
    r = router(Routing(weights={1: 100}, sticky=STICKY, canary=canary), [1, 2])
    before = {key: r.route(key=key).version for key in KEYS}
    feed(r, "canary", 20)
    assert r.canary is not None and r.canary.weight == 40
    after = {key: r.route(key=key).version for key in KEYS}
    assert all(after[key] == 2 for key in KEYS if before[key] == 2)
    moved = sum(before[key] == 1 and after[key] == 2 for key in KEYS)
    assert within_binomial(moved, len(KEYS), 0.40 - 0.10), moved


# --------------------------------------------------------------------------- canary: steps and rollback


def test_a_canary_starts_ramping_at_its_first_step() -> None:
    r = canary_router(steps=[5, 25, 50])
    assert r.canary is not None
    assert (r.canary.version, r.canary.weight, r.canary.step, r.canary.state, r.canary.reason) == (
        2,
        5,
        0,
        "ramping",
        "",
    )


def test_a_canary_within_its_limits_advances_a_step_after_step_requests_canary_observations() -> None:
    r = canary_router(steps=[5, 25, 50], step_requests=20)
    assert r.canary is not None
    feed(r, "split", 500)  # primary traffic alone never moves a step
    feed(r, "canary", 19)
    assert (r.canary.step, r.canary.weight) == (0, 5)
    feed(r, "canary", 1)
    assert (r.canary.step, r.canary.weight, r.canary.state) == (1, 25, "ramping")
    feed(r, "canary", 20)
    assert (r.canary.step, r.canary.weight, r.canary.state) == (2, 50, "ramping")


def test_requested_versions_do_not_count_towards_a_canary_step() -> None:
    r = canary_router(steps=[5, 25], step_requests=20)
    assert r.canary is not None
    for _ in range(100):
        r.observe(Decision(2, "requested"), False, SLOW)
    assert (r.canary.step, r.canary.state) == (0, "ramping")


def test_a_canary_that_completes_its_last_step_holds_at_that_weight() -> None:
    r = canary_router(steps=[5, 25], step_requests=20)
    assert r.canary is not None
    feed(r, "canary", 40)
    assert (r.canary.step, r.canary.weight, r.canary.state) == (1, 25, "complete")
    feed(r, "canary", 100, ok=False)  # a complete canary is no longer judged
    assert (r.canary.weight, r.canary.state) == (25, "complete")
    decisions = [r.route() for _ in range(DRAWS)]
    assert within_binomial(sum(d.arm == "canary" for d in decisions), DRAWS, 0.25)


def test_a_canary_over_its_error_rate_is_rolled_back_at_the_end_of_the_step() -> None:
    r = canary_router(steps=[5, 25], step_requests=20, max_error_rate=0.01)
    assert r.canary is not None
    feed(r, "canary", 1, ok=False)  # 1 in 20 is 5% > 1%
    feed(r, "canary", 18)
    assert r.canary.state == "ramping"  # judged only when the step is over
    feed(r, "canary", 1)
    assert (r.canary.state, r.canary.weight, r.canary.step) == ("rolled_back", 0, 0)
    assert "error rate" in r.canary.reason


def test_a_canary_at_its_error_rate_limit_advances() -> None:
    r = canary_router(steps=[5, 25], step_requests=20, max_error_rate=0.05)
    assert r.canary is not None
    feed(r, "canary", 1, ok=False)  # exactly 5%
    feed(r, "canary", 19)
    assert (r.canary.state, r.canary.weight) == ("ramping", 25)


def test_a_canary_slower_than_its_p99_ratio_is_rolled_back() -> None:
    r = canary_router(steps=[5, 25], step_requests=20, max_p99_ratio=2.0)
    assert r.canary is not None
    feed(r, "split", 200, latency_s=FAST)
    feed(r, "canary", 20, latency_s=SLOW)  # 3x the primary's p99
    assert (r.canary.state, r.canary.weight) == ("rolled_back", 0)
    assert "p99" in r.canary.reason


def test_a_canary_within_its_p99_ratio_advances() -> None:
    r = canary_router(steps=[5, 25], step_requests=20, max_p99_ratio=4.0)
    assert r.canary is not None
    feed(r, "split", 200, latency_s=FAST)
    feed(r, "canary", 20, latency_s=SLOW)  # 3x, under 4x
    assert (r.canary.state, r.canary.weight) == ("ramping", 25)


def test_a_rolled_back_canary_gets_no_more_traffic_and_stays_rolled_back() -> None:
    r = canary_router(steps=[5, 25], step_requests=20, max_error_rate=0.0)
    assert r.canary is not None
    feed(r, "canary", 20, ok=False)
    assert r.canary.state == "rolled_back"
    reason = r.canary.reason
    assert {r.route() for _ in range(DRAWS)} == {Decision(1, "split")}
    assert {r.route(key=key).version for key in KEYS} == {1}
    feed(r, "canary", 100)  # late answers from canary requests already in flight change nothing
    assert (r.canary.state, r.canary.weight, r.canary.reason) == ("rolled_back", 0, reason)


# --------------------------------------------------------------------------- routing that does not fit


@pytest.mark.parametrize(
    ("routing", "field"),
    [
        pytest.param(Routing(weights={1: 50, 7: 50}), "weights.7", id="weighted version"),
        pytest.param(Routing(weights={1: 100, 7: 0}), "weights.7", id="zero-weight version"),
        pytest.param(Routing(weights={1: 100}, shadow=ShadowRouting(version=9)), "shadow.version", id="shadow"),
        pytest.param(
            Routing(weights={1: 100}, canary=CanaryRouting(version=5, steps=[10])), "canary.version", id="canary"
        ),
    ],
)
def test_routing_that_names_a_version_that_is_not_loaded_is_refused_naming_the_field(
    routing: Routing, field: str
) -> None:
    with pytest.raises(RoutingError) as refused:
        check_routing(routing, [1, 2])
    assert refused.value.field == field
    assert str(refused.value).startswith(f"routing.{field}: ")
    assert "not loaded" in str(refused.value)
    with pytest.raises(RoutingError) as refused_by_router:
        router(routing, [1, 2])
    assert refused_by_router.value.field == field


def test_routing_that_fits_the_loaded_versions_is_accepted() -> None:
    routing = Routing(
        weights={1: 100}, shadow=ShadowRouting(version=2), canary=CanaryRouting(version=3, steps=[10]), sticky=STICKY
    )
    check_routing(routing, [1, 2, 3])
    check_routing(Routing(), [1])


@pytest.mark.parametrize(
    ("routing", "loaded", "field"),
    [
        pytest.param(Routing(shadow=ShadowRouting(version=2)), [2], "shadow.version", id="only the shadow"),
        pytest.param(Routing(canary=CanaryRouting(version=2, steps=[10])), [2], "canary.version", id="only the canary"),
        pytest.param(
            Routing(shadow=ShadowRouting(version=1), canary=CanaryRouting(version=2, steps=[10])),
            [1, 2],
            "shadow.version",
            id="only the shadow and the canary",
        ),
    ],
)
def test_routing_without_weights_that_leaves_no_version_to_answer_callers_is_refused(
    routing: Routing, loaded: list[int], field: str
) -> None:
    with pytest.raises(RoutingError) as refused:
        check_routing(routing, loaded)
    assert refused.value.field == field


def test_a_routing_error_is_a_value_error() -> None:
    assert issubclass(RoutingError, ValueError)


@pytest.mark.parametrize(
    ("routing", "loaded", "primary"),
    [
        (Routing(), [1, 2, 3], 3),
        (Routing(weights={1: 90, 2: 10}), [1, 2, 3], 1),
        (Routing(weights={1: 50, 2: 50}), [1, 2, 3], 2),
        (Routing(shadow=ShadowRouting(version=3)), [1, 2, 3], 2),
        (Routing(canary=CanaryRouting(version=3, steps=[10])), [1, 2, 3], 2),
    ],
)
def test_the_primary_stands_for_the_model_in_metadata(routing: Routing, loaded: list[int], primary: int) -> None:
    assert Router("m", routing, loaded).primary == primary


class Judgements:
    """Records what a router tells its CanaryEvents, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[object, ...]] = []

    def canary_step(self, model: str, version: int, step: int, weight: float) -> None:
        self.told.append(("step", model, version, step, weight))

    def canary_completed(self, model: str, version: int, weight: float) -> None:
        self.told.append(("completed", model, version, weight))

    def canary_rolled_back(self, model: str, version: int, reason: str) -> None:
        self.told.append(("rolled_back", model, version, reason.split(" ", 2)[:2]))


def test_each_canary_judgement_is_told_to_its_events_once() -> None:
    events = Judgements()
    canary = CanaryRouting(version=2, steps=[5, 25], step_requests=20)
    r = Router("toy", Routing(weights={1: 100}, canary=canary), [1, 2], rng=random.Random(SEED), events=events)
    feed(r, "canary", 40)
    feed(r, "canary", 100)  # a complete canary is no longer judged: nothing more is told
    assert events.told == [("step", "toy", 2, 1, 25), ("completed", "toy", 2, 25)]


def test_a_rollback_is_told_with_its_reason() -> None:
    events = Judgements()
    canary = CanaryRouting(version=2, steps=[5, 25], step_requests=20, max_error_rate=0.0)
    r = Router("toy", Routing(weights={1: 100}, canary=canary), [1, 2], rng=random.Random(SEED), events=events)
    feed(r, "canary", 60, ok=False)
    assert events.told == [("rolled_back", "toy", 2, ["error", "rate"])]
