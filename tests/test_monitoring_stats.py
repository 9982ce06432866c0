"""The drift statistics and the sliding window, as pure functions (no server, no threads)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from monitoring_support import spec, tensor

from infergate.models.spec import TensorSpec
from infergate.monitoring import drift
from infergate.monitoring.features import choose_reduction, extract
from infergate.monitoring.profile import CategoricalFeature, NumericFeature, build_profile
from infergate.monitoring.window import DriftWindow

REFERENCE = np.random.default_rng(7).standard_normal(20_000)
QUANTILES = np.quantile(REFERENCE, drift.QUANTILE_GRID)
INNER = np.unique(np.quantile(REFERENCE, np.linspace(0, 1, 11)[1:-1]))
EDGES, COUNTS = drift.outer_bins(INNER, drift.bin_counts(INNER, REFERENCE), REFERENCE.min(), REFERENCE.max())


def live(shift: float, rows: int = 2000, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(rows) + shift


def score(method: str, values: np.ndarray) -> float:
    if method == "psi":
        return drift.psi(EDGES, COUNTS, values)
    if method == "ks":
        return drift.ks(QUANTILES, values)
    return drift.wasserstein(QUANTILES, float(REFERENCE.std()), values)


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_a_window_from_the_reference_distribution_scores_far_below_the_default_threshold(method: str) -> None:
    assert score(method, live(0.0)) < 0.1


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_a_two_sigma_shift_scores_far_above_the_default_threshold(method: str) -> None:
    assert score(method, live(2.0)) > 0.5


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_scores_grow_with_the_shift(method: str) -> None:
    scores = [score(method, live(shift)) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert scores == sorted(scores)


@pytest.mark.parametrize(
    ("reference", "current", "expected"),
    [
        ([50, 50], [50, 50], 0.0),
        ([1, 1], [10, 10], 0.0),  # proportions, not counts
        ([50, 50], [25, 75], (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)),
        ([100, 0], [100, 0], 0.0),  # an empty bin on both sides costs nothing
        ([0, 0], [10, 0], 0.0),  # nothing to compare with
    ],
)
def test_psi_from_counts(reference: list[int], current: list[int], expected: float) -> None:
    assert drift.psi_from_counts(reference, current) == pytest.approx(expected)


def test_psi_refuses_histograms_over_different_bins() -> None:
    with pytest.raises(ValueError, match="differ in bins"):
        drift.psi_from_counts([1, 2], [1, 2, 3])


def test_a_value_on_a_bin_edge_falls_in_the_bin_above() -> None:
    assert drift.bin_counts([0.0, 1.0], np.array([-1.0, 0.0, 0.5, 1.0, 2.0])).tolist() == [1, 2, 2]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-1.5], [1, 0, 0, 0, 0]),  # below the reference's minimum
        ([-1.0, -0.5], [0, 2, 0, 0, 0]),  # the minimum itself is in the reference's lowest bin
        ([1.0, 2.0], [0, 0, 0, 2, 0]),  # and the maximum in its highest
        ([np.nextafter(2.0, 3.0), 1e9], [0, 0, 0, 0, 2]),  # above the maximum
    ],
)
def test_psi_adds_a_bin_of_one_count_below_the_reference_minimum_and_one_above_its_maximum(
    values: list[float], expected: list[int]
) -> None:
    edges, counts = drift.outer_bins([0.0, 1.0], [1, 2, 2], -1.0, 2.0)
    assert counts.tolist() == [1, 1, 2, 2, 1]
    assert drift.bin_counts(edges, np.array(values)).tolist() == expected


@pytest.mark.parametrize(
    ("edges", "low", "high", "expected"),
    [
        ([], 1.0, 1.0, [1.0, np.nextafter(1.0, 2.0)]),  # one bin (--bins 1) of a constant feature
        ([0.0, 1.0], 0.5, 0.5, [0.0, 0.0, 1.0, np.nextafter(1.0, 2.0)]),  # min and max inside the edges
        ([], 2.0, 1.0, [2.0, np.nextafter(2.0, 3.0)]),  # min above max
    ],
)
def test_outer_bin_edges_never_decrease_whatever_minimum_and_maximum_a_profile_holds(
    edges: list[float], low: float, high: float, expected: list[float]
) -> None:
    assert drift.outer_bins(edges, [1] * (len(edges) + 1), low, high)[0].tolist() == expected


def constant_window(live: np.ndarray) -> DriftWindow:
    """A window holding ``live`` of a feature that was always 1.0 in the reference."""
    model = spec(tensor("x", "FP32", -1, 1))
    profile = build_profile(model, {"x": np.ones((1000, 1), np.float32)}, {}, source="t")
    window = DriftWindow(profile, len(live), batches=True)
    window.add({"x": live.astype(np.float32).reshape(-1, 1)}, {})
    return window


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
@pytest.mark.parametrize("moved", [1.5, 0.5])
def test_a_feature_constant_in_the_reference_alerts_when_it_moves_either_way(method: str, moved: float) -> None:
    assert [s.alert for s in constant_window(np.full(500, 1.0)).scores(method, 0.2)] == [False]
    assert [s.alert for s in constant_window(np.full(500, moved)).scores(method, 0.2)] == [True]


def test_a_tenth_of_a_constant_feature_moving_up_alerts_on_psi() -> None:
    (moved,) = constant_window(np.r_[np.full(450, 1.0), np.full(50, 2.0)]).scores("psi", 0.2)
    outer = 1 / 1002  # the reference: 1,000 rows of 1.0 and one count in each outer bin
    below = (drift.PSI_FLOOR - outer) * math.log(drift.PSI_FLOOR / outer)
    beyond = (0.1 - outer) * math.log(0.1 / outer)
    middle = (0.9 - 1000 / 1002) * math.log(0.9 / (1000 / 1002))
    assert moved.score == pytest.approx(below + middle + beyond) and moved.alert


def test_a_small_reference_sample_does_not_make_its_own_distribution_drift() -> None:
    """About one live value in rows + 1 falls past each end of a sample's range by chance: the outer bins'
    one count each keep a 150-row profile's own distribution under the alert threshold."""
    model = spec(tensor("x", "FP32", -1, 1))
    scores = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        profile = build_profile(model, {"x": rng.standard_normal((150, 1)).astype(np.float32)}, {}, source="t")
        window = DriftWindow(profile, 2000, batches=True)
        window.add({"x": rng.standard_normal((2000, 1)).astype(np.float32)}, {})
        scores += window.scores("psi", 0.2)
    assert not [s.score for s in scores if s.alert]


@pytest.mark.parametrize("far", [10.0, -10.0])
def test_a_tenth_of_the_window_beyond_the_reference_range_alerts_on_psi(far: float) -> None:
    values = live(0.0)
    values[::10] = far
    assert score("psi", values) > 0.5


def test_wasserstein_is_measured_in_reference_sigmas() -> None:
    wide = REFERENCE * 10
    quantiles = np.quantile(wide, drift.QUANTILE_GRID)
    assert drift.wasserstein(quantiles, float(wide.std()), live(1.5) * 10) == pytest.approx(1.5, abs=0.1)


def test_ks_handles_a_feature_with_few_distinct_values() -> None:
    rng = np.random.default_rng(3)
    quantiles = np.quantile(rng.integers(0, 3, 10_000).astype(float), drift.QUANTILE_GRID)
    assert drift.ks(quantiles, rng.integers(0, 3, 2000).astype(float)) < 0.05
    assert drift.ks(quantiles, rng.integers(1, 4, 2000).astype(float)) > 0.3


@pytest.mark.parametrize(
    ("values", "expected"),
    [(np.zeros(10), 0.0), (np.ones(10), 1.0)],
)
def test_ks_and_wasserstein_against_a_constant_reference(values: np.ndarray, expected: float) -> None:
    constant = np.zeros(len(drift.QUANTILE_GRID))
    assert drift.ks(constant, values) == expected
    assert drift.wasserstein(constant, 0.0, values) == expected


def test_a_few_non_finite_live_values_barely_move_a_score() -> None:
    values = np.concatenate([live(0.0), [np.nan, np.inf, -np.inf]])
    for method in ("psi", "ks", "wasserstein"):
        assert score(method, values) == pytest.approx(score(method, live(0.0)), abs=0.01)


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_live_values_that_are_all_non_finite_score_far_above_the_default_threshold(method: str) -> None:
    assert score(method, np.array([np.nan, np.inf, -np.inf] * 10)) > 1.0


def test_categorical_psi_counts_unseen_categories_in_other() -> None:
    reference = {"a": 50, "b": 50}
    assert drift.categorical_psi(reference, 0, ["a", "b"] * 50) == pytest.approx(0.0)
    assert drift.categorical_psi(reference, 0, ["a", "b", "zzz", "yyy"] * 25) > 1.0


# --- reductions and the window ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "output", "reduction"),
    [
        (tensor("x", "FP32", -1), False, "value"),
        (tensor("x", "FP32", -1, 4), False, "columns"),
        (tensor("x", "INT64", -1, 1), False, "columns"),
        (tensor("x", "BYTES", -1, 2), False, "columns"),
        (tensor("x", "FP32", -1, 3, 8, 8), False, "channel_mean"),
        (tensor("x", "FP32", -1, -1), False, "row_mean"),
        (tensor("y", "FP32", -1, 10), True, "argmax"),
        (tensor("y", "FP32", -1, 1), True, "columns"),
        (tensor("y", "INT64", -1, 10), True, "columns"),
    ],
)
def test_each_shape_gets_its_documented_reduction(t: TensorSpec, output: bool, reduction: str) -> None:
    assert choose_reduction(t, batches=True, output=output) == reduction


def test_text_of_variable_length_cannot_be_monitored() -> None:
    with pytest.raises(ValueError, match="no per-row categories"):
        choose_reduction(tensor("t", "BYTES", -1, -1), batches=True, output=False)


def test_channel_mean_averages_each_channel_of_each_row() -> None:
    images = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    assert extract(images, "channel_mean", batches=True).tolist() == [[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]


def test_a_model_that_does_not_batch_gives_one_row_per_request() -> None:
    assert extract(np.array([1.0, 2.0, 3.0]), "columns", batches=False).tolist() == [[1.0, 2.0, 3.0]]


def test_the_window_keeps_only_the_last_rows() -> None:
    model = spec(tensor("x", "FP32", -1, 1))
    sample = {"x": np.arange(100, dtype=np.float32).reshape(100, 1)}
    window = DriftWindow(build_profile(model, sample, {}, source="t"), capacity=10, batches=True)
    for start in range(0, 25, 3):  # requests of 3 rows wrap around the ring
        window.add({"x": np.arange(start, start + 3, dtype=np.float32).reshape(3, 1)}, {})
    assert window.fill == 10
    values = window.tensors[0]._buffer[:, 0]
    assert sorted(values.tolist()) == list(range(17, 27))
    window.add({"x": np.arange(1000, 1050, dtype=np.float32).reshape(50, 1)}, {})  # more rows than fit
    assert sorted(window.tensors[0]._buffer[:, 0].tolist()) == list(range(1040, 1050))


def test_the_window_names_the_tensor_that_does_not_fit() -> None:
    model = spec(tensor("x", "FP32", -1, 2))
    window = DriftWindow(build_profile(model, {"x": np.zeros((10, 2))}, {}, source="t"), 10, batches=True)
    with pytest.raises(ValueError, match="input x: 3 features, the profile has 2"):
        window.add({"x": np.zeros((1, 3))}, {})
    with pytest.raises(ValueError, match="input x is missing"):
        window.add({}, {})


def test_the_window_of_a_model_that_does_not_batch_takes_one_row_per_request() -> None:
    model = spec(tensor("x", "FP32", 2), batch=0)
    window = DriftWindow(build_profile(model, {"x": np.zeros((10, 2))}, {}, source="t"), 10, batches=False)
    assert window.add({"x": np.array([1.0, 2.0], np.float32)}, {}) == 1
    assert window.fill == 1 and window.tensors[0]._buffer[0].tolist() == [1.0, 2.0]


def test_a_row_with_no_elements_is_left_out_of_an_integer_categorical_feature() -> None:
    model = spec(tensor("ids", "INT32", -1, -1))
    profile = build_profile(model, {"ids": np.array([[1, 1], [2, 2]] * 50, np.int32)}, {}, source="t")
    assert isinstance(profile.inputs["ids"].features[0], CategoricalFeature)
    window = DriftWindow(profile, 100, batches=True)
    window.add({"ids": np.zeros((1, 0), np.int32)}, {})
    window.add({"ids": np.array([[1, 1], [2, 2]] * 10, np.int32)}, {})
    assert [s.score for s in window.scores("psi", 0.2)] == [pytest.approx(0.0)]


def test_the_window_scores_many_features_as_each_would_score_alone() -> None:
    """The row-wise forms the window uses give the scalar functions' scores, non-finite values included."""
    rng = np.random.default_rng(9)
    model = spec(tensor("x", "FP32", -1, 3))
    sample = rng.standard_normal((3000, 3)) * [1.0, 5.0, 0.1]
    profile = build_profile(model, {"x": sample.astype(np.float32)}, {}, source="t")
    live = (rng.standard_normal((500, 3)) * [1.0, 5.0, 0.1] + [0.0, 2.0, 0.05]).astype(np.float32)
    live[3, 1], live[7, 2] = np.nan, np.inf
    window = DriftWindow(profile, 500, batches=True)
    window.add({"x": live}, {})
    for method in ("psi", "ks", "wasserstein"):
        scores = [s.score for s in window.scores(method, 0.2)]
        for j, feature in enumerate(profile.inputs["x"].features):
            assert isinstance(feature, NumericFeature)
            assert scores[j] == pytest.approx(alone(method, feature, live[:, j])), (method, j)


def alone(method: str, feature: NumericFeature, values: np.ndarray) -> float:
    column = values.astype(np.float64)
    if method == "psi":
        return drift.psi(*drift.outer_bins(feature.edges, feature.counts, feature.min, feature.max), column)
    if method == "ks":
        return drift.ks(feature.quantiles, column)
    return drift.wasserstein(feature.quantiles, feature.std, column)


def text_window(capacity: int = 100) -> DriftWindow:
    """A window over two text features (a [batch, 2] BYTES input) profiled on cities and colours."""
    model = spec(tensor("t", "BYTES", -1, 2))
    sample = np.array([[b"paris", b"red"], [b"oslo", b"blue"], [b"paris", b"blue"]] * 50, dtype=object)
    return DriftWindow(build_profile(model, {"t": sample}, {}, source="t"), capacity, batches=True)


def test_the_window_keeps_no_text_only_the_category_of_each_value() -> None:
    """Scores need only which category a value falls in: a request's text must not live on in the window."""
    large = b"x" * (1 << 20) + b"unique"
    small, big = text_window(), text_window()
    small.add({"t": np.array([[b"paris", b"red"], [b"zzz", b"blue"]], dtype=object)}, {})
    refs = sys.getrefcount(large)
    big.add({"t": np.array([[b"paris", b"red"], [large, b"blue"]], dtype=object)}, {})
    assert sys.getrefcount(large) == refs  # the request's array is gone, and nothing else holds the text
    buffer = big.tensors[0]._buffer
    assert buffer.dtype.kind == "i" and buffer.nbytes == small.tensors[0]._buffer.nbytes
    assert [s.score for s in big.scores("psi", 0.2)] == [s.score for s in small.scores("psi", 0.2)]


@pytest.mark.parametrize(
    ("cities", "colours"),
    [
        (["paris", "oslo", "paris"], ["red", "blue", "blue"]),  # the reference's own shares
        (["paris"] * 3, ["red"] * 3),  # one category only
        (["oslo", "rome", "\xff"], ["green", "blue", "red"]),  # unseen ones count in "other"
    ],
)
def test_text_features_score_as_categorical_psi_of_their_values(cities: list[str], colours: list[str]) -> None:
    window = text_window()
    rows = np.array([[c.encode(), k.encode()] for c, k in zip(cities * 10, colours * 10, strict=True)], dtype=object)
    window.add({"t": rows}, {})
    features = window.tensors[0].profile.features
    expected = []
    for feature, values in zip(features, (cities * 10, colours * 10), strict=True):
        assert isinstance(feature, CategoricalFeature)
        expected.append(drift.categorical_psi(feature.categories, feature.other, values))
    assert [s.score for s in window.scores("psi", 0.2)] == pytest.approx(expected)
    assert expected[0] > 0.2 or cities == ["paris", "oslo", "paris"]


def mixed_window(missing_share: float) -> DriftWindow:
    """A window over two normal features, the second one missing (NaN) in ``missing_share`` of the sample."""
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2000, 2))
    sample[: int(2000 * missing_share), 1] = np.nan
    profile = build_profile(spec(tensor("x", "FP32", -1, 2)), {"x": sample.astype(np.float32)}, {}, source="t")
    return DriftWindow(profile, 1000, batches=True)


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_a_feature_that_turns_entirely_non_finite_alerts(method: str) -> None:
    window = mixed_window(0.0)
    rows = np.random.default_rng(6).standard_normal((1000, 2)).astype(np.float32)
    rows[:, 1] = np.nan
    rows[::2, 1] = np.inf
    window.add({"x": rows}, {})
    assert [s.alert for s in window.scores(method, 0.2)] == [False, True]


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein"])
def test_a_feature_missing_as_often_as_in_the_reference_does_not_alert(method: str) -> None:
    window = mixed_window(0.3)
    rows = np.random.default_rng(6).standard_normal((1000, 2)).astype(np.float32)
    rows[:300, 1] = np.nan
    window.add({"x": rows}, {})
    assert [s.alert for s in window.scores(method, 0.2)] == [False, False]
