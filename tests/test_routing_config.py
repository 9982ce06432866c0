"""A model's ``version_policy`` and ``routing`` blocks, read from config.yaml.

A good block gives the policy or routing it spells; a bad one raises
ConfigError naming the file and the dotted path of the field at fault. Checks
that involve several fields (a shadow that also has a weight) are blamed on
the block that holds them, and the message names the fields involved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infergate.config import ConfigError
from infergate.models.config import VersionPolicy, load_model_config
from infergate.routing.config import CanaryRouting, Routing, ShadowRouting, StickyRouting


def write(directory: Path, text: str) -> Path:
    path = directory / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refusal(tmp_path: Path, text: str) -> tuple[Path, str]:
    """Load ``text`` as a model's config.yaml, expecting ConfigError; its path and message."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_model_config(path)
    return path, str(refused.value)


# --------------------------------------------------------------------------- version_policy


@pytest.mark.parametrize(
    ("text", "available", "served"),
    [
        pytest.param("", [1, 2, 3], [3], id="default: the newest"),
        pytest.param("version_policy: {}\n", [1, 2, 3], [3], id="empty policy: the newest"),
        pytest.param("version_policy:\n  latest: {}\n", [1, 2, 3], [3], id="latest, default count"),
        pytest.param("version_policy:\n  latest: {num_versions: 2}\n", [3, 1, 2], [2, 3], id="latest 2"),
        pytest.param("version_policy:\n  latest: {num_versions: 5}\n", [1, 2], [1, 2], id="latest, more than exist"),
        pytest.param("version_policy:\n  all: {}\n", [3, 1, 2], [1, 2, 3], id="all"),
        pytest.param("version_policy:\n  specific: {versions: [1, 3]}\n", [1, 2, 3], [1, 3], id="specific"),
        pytest.param(
            "version_policy:\n  specific: {versions: [3, 7]}\n", [1, 2, 3], [3], id="specific, one not on disk"
        ),
    ],
)
def test_the_version_policy_selects_the_versions_to_serve_oldest_first(
    tmp_path: Path, text: str, available: list[int], served: list[int]
) -> None:
    policy = load_model_config(write(tmp_path, text)).version_policy
    assert policy.select(available) == served


@pytest.mark.parametrize(
    ("policy", "available", "served"),
    [
        pytest.param(VersionPolicy(), [], [], id="nothing on disk"),
        pytest.param(VersionPolicy(), [10, 9, 100], [100], id="numeric, not text, order"),
        pytest.param(VersionPolicy(latest={"num_versions": 2}), [1], [1], id="latest 2 of one"),
        pytest.param(VersionPolicy(all={}), [], [], id="all of nothing"),
        pytest.param(VersionPolicy(specific={"versions": [2]}), [1, 3], [], id="specific, none on disk"),
        pytest.param(VersionPolicy(specific={"versions": [2, 2, 1]}), [1, 2], [1, 2], id="specific, repeated"),
    ],
)
def test_version_policy_select(policy: VersionPolicy, available: list[int], served: list[int]) -> None:
    assert policy.select(available) == served


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("version_policy:\n  latest: {num_versions: 2}\n  all: {}\n", "version_policy", id="two kinds"),
        pytest.param("version_policy:\n  all: {x: 1}\n", "version_policy", id="all with options"),
        pytest.param(
            "version_policy:\n  specific: {versions: []}\n", "version_policy.specific.versions", id="specific, none"
        ),
        pytest.param(
            "version_policy:\n  latest: {num_versions: 0}\n", "version_policy.latest.num_versions", id="latest 0"
        ),
        pytest.param("version_policy:\n  newest: {}\n", "version_policy.newest", id="unknown kind"),
    ],
)
def test_a_bad_version_policy_names_the_file_and_the_field(tmp_path: Path, text: str, field: str) -> None:
    path, message = refusal(tmp_path, text)
    assert f"{path}: {field}: " in message, message


def test_two_policy_kinds_at_once_are_named_in_the_message(tmp_path: Path) -> None:
    _, message = refusal(tmp_path, "version_policy:\n  latest: {}\n  specific: {versions: [1]}\n")
    assert "latest, specific" in message


# --------------------------------------------------------------------------- routing: valid


def test_a_full_routing_block_is_read_field_by_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
version_policy:
  all: {}
routing:
  weights: {1: 90, 2: 10}
  sticky: {header: x-user}
  shadow: {version: 3, fraction: 0.25, queue_size: 8, timeout_seconds: 2}
  canary: {version: 4, steps: [5, 25, 50], step_requests: 100, max_error_rate: 0.02, max_p99_ratio: 1.5}
""",
    )
    assert load_model_config(path).routing == Routing(
        weights={1: 90, 2: 10},
        sticky=StickyRouting(header="x-user"),
        shadow=ShadowRouting(version=3, fraction=0.25, queue_size=8, timeout_seconds=2),
        canary=CanaryRouting(version=4, steps=[5, 25, 50], step_requests=100, max_error_rate=0.02, max_p99_ratio=1.5),
    )


def test_routing_defaults(tmp_path: Path) -> None:
    config = load_model_config(
        write(tmp_path, "routing:\n  shadow: {version: 2}\n  canary: {version: 3, steps: [10]}\n")
    )
    assert config.routing is not None
    assert config.routing.weights == {}
    assert (config.routing.shadow, config.routing.canary) == (
        ShadowRouting(version=2, fraction=1.0, queue_size=64, timeout_seconds=30.0),
        CanaryRouting(version=3, steps=[10], step_requests=200, max_error_rate=0.01, max_p99_ratio=2.0),
    )
    assert load_model_config(write(tmp_path, "")).routing is None


def test_a_zero_weight_is_allowed_beside_a_positive_one(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path, "routing:\n  weights: {1: 100, 2: 0}\n  shadow: {version: 2}\n"))
    assert config.routing is not None
    assert config.routing.versions() == {"weights.1": 1, "weights.2": 2, "shadow.version": 2}


def test_sticky_takes_a_header_or_a_parameter(tmp_path: Path) -> None:
    by_header = load_model_config(write(tmp_path, "routing:\n  sticky: {header: x-user.id}\n")).routing
    by_parameter = load_model_config(write(tmp_path, "routing:\n  sticky: {parameter: user}\n")).routing
    assert by_header is not None and by_header.sticky == StickyRouting(header="x-user.id")
    assert by_parameter is not None and by_parameter.sticky == StickyRouting(parameter="user")


def test_routing_is_left_out_of_what_decides_how_versions_load(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path, "max_batch_size: 8\nrouting:\n  weights: {1: 1}\n"))
    assert config.without_routing().routing is None
    assert config.without_routing().max_batch_size == 8


# --------------------------------------------------------------------------- routing: refused


BAD_ROUTING = [
    # (text, field path, words the message must hold)
    pytest.param("routing:\n  weights: {1: 0, 2: 0}\n", "routing", "positive total", id="weights sum to 0"),
    pytest.param("routing:\n  weights: {1: -1, 2: 10}\n", "routing.weights.1", "greater than", id="negative weight"),
    pytest.param(
        "routing:\n  weights: {x: 10}\n", "routing.weights.x.[key]", "integer", id="a version that is no number"
    ),
    pytest.param(
        "routing:\n  weights: {-1: 10}\n", "routing.weights.-1.[key]", "greater than", id="a negative version"
    ),
    pytest.param(
        "routing:\n  weights: {1: 50, 2: 50}\n  shadow: {version: 2}\n",
        "routing",
        "shadow itself",
        id="shadow with a weight",
    ),
    pytest.param(
        "routing:\n  weights: {1: 50, 2: 50}\n  canary: {version: 2, steps: [10]}\n",
        "routing",
        "canary.version 2",
        id="canary with a weight",
    ),
    pytest.param(
        "routing:\n  shadow: {version: 2}\n  canary: {version: 2, steps: [10]}\n",
        "routing",
        "both the shadow and the canary",
        id="shadow is the canary",
    ),
    pytest.param(
        "routing:\n  shadow: {version: 2, fraction: 1.5}\n", "routing.shadow.fraction", "less than", id="fraction > 1"
    ),
    pytest.param(
        "routing:\n  shadow: {version: 2, fraction: -0.1}\n",
        "routing.shadow.fraction",
        "greater than",
        id="fraction < 0",
    ),
    pytest.param(
        "routing:\n  shadow: {fraction: 0.5}\n", "routing.shadow.version", "required", id="shadow, no version"
    ),
    pytest.param(
        "routing:\n  shadow: {version: 2, timeout_seconds: 0}\n",
        "routing.shadow.timeout_seconds",
        "greater than",
        id="shadow timeout 0",
    ),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [10, 10]}\n", "routing.canary", "increase", id="steps repeat"
    ),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [50, 10]}\n", "routing.canary", "increase", id="steps decrease"
    ),
    pytest.param("routing:\n  canary: {version: 2, steps: []}\n", "routing.canary.steps", "at least 1", id="no steps"),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [10, 150]}\n", "routing.canary.steps.1", "less than", id="step > 100"
    ),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [0, 10]}\n", "routing.canary.steps.0", "greater than", id="step 0"
    ),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [10], step_requests: 5}\n",
        "routing.canary.step_requests",
        "greater than",
        id="too few step requests",
    ),
    pytest.param(
        "routing:\n  canary: {version: 2, steps: [10], max_p99_ratio: 0.5}\n",
        "routing.canary.max_p99_ratio",
        "greater than",
        id="p99 ratio under 1",
    ),
    pytest.param(
        "routing:\n  sticky: {header: x-user, parameter: user}\n", "routing.sticky", "exactly one", id="sticky, both"
    ),
    pytest.param("routing:\n  sticky: {}\n", "routing.sticky", "exactly one", id="sticky, neither"),
    pytest.param(
        "routing:\n  sticky: {header: X-User}\n", "routing.sticky.header", "pattern", id="sticky header not lower-case"
    ),
    pytest.param("routing:\n  wieghts: {1: 1}\n", "routing.wieghts", "not permitted", id="unknown key in routing"),
    pytest.param(
        "routing:\n  shadow: {version: 2, fractoin: 0.5}\n",
        "routing.shadow.fractoin",
        "not permitted",
        id="shadow typo",
    ),
    pytest.param("routing: [1, 2]\n", "routing", "", id="a list for a block"),
    pytest.param("routing:\n  weights: {1: .inf, 2: 1}\n", "routing.weights.1", "", id="an infinite weight"),
    pytest.param(
        "routing:\n  weights: {1: 1.0e+308, 2: 1.0e+308}\n",
        "routing.weights",
        "sum to a finite total",
        id="finite weights with an infinite sum",
    ),
]


@pytest.mark.parametrize(("text", "field", "says"), BAD_ROUTING)
def test_a_bad_routing_block_names_the_file_and_the_field(tmp_path: Path, text: str, field: str, says: str) -> None:
    path, message = refusal(tmp_path, text)
    assert f"{path}: {field}: " in message, message
    assert says in message, message


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("routing:\n  weights: {1: 50, 2: 50}\n  shadow: {version: 2}\n", "shadow.version", id="shadow"),
        pytest.param(
            "routing:\n  weights: {1: 50, 2: 50}\n  canary: {version: 2, steps: [10]}\n", "canary.version", id="canary"
        ),
    ],
)
def test_a_version_with_a_weight_and_a_role_names_the_role(tmp_path: Path, text: str, named: str) -> None:
    _, message = refusal(tmp_path, text)
    assert f"{named} 2" in message, message
