"""The target's forward-cost curve: measured once per backend configuration, then read back."""

from __future__ import annotations

import json

import pytest
from toy import ToyBackend

from specdecode.config import SamplingParams, SpecConfig
from specdecode.control import cost_curve
from specdecode.engine import Engine


class KeyedToy(ToyBackend):
    """A toy model whose costs may be cached, as a real backend's are."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.all_forward_sizes: list[int] = []  # unlike forward_sizes, kept across resets

    def forward(self, token_ids, positions=None, tree_mask=None, return_logits=True):
        self.all_forward_sizes.append(int(token_ids.shape[0]))
        return super().forward(token_ids, positions, tree_mask, return_logits)

    @property
    def cost_key(self) -> str:
        return "toy-costs-test"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDECODE_CACHE", str(tmp_path))
    return tmp_path


def test_measured_once_then_read_from_the_cache(cache, monkeypatch) -> None:
    backend = KeyedToy()
    curve = cost_curve.load_or_measure(backend)
    assert curve is not None and sorted(curve) == list(cost_curve.MEASURED_LENGTHS)
    assert all(seconds > 0 for seconds in curve.values())
    # A forward of k + 1 tokens was timed for each length, after the synthetic context.
    assert {k + 1 for k in cost_curve.MEASURED_LENGTHS} <= set(backend.all_forward_sizes)
    assert backend.num_cached == 0  # measuring leaves the backend empty
    saved = json.loads(cost_curve.cache_path("toy-costs-test").read_text())
    assert saved["key"] == "toy-costs-test"

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(cost_curve, "measure", no_measuring)
    assert cost_curve.load_or_measure(KeyedToy()) == curve


def test_another_cpu_measures_its_own_curve(cache, monkeypatch) -> None:
    this_cpu = cost_curve.cpu_identity
    curve = cost_curve.load_or_measure(KeyedToy())
    monkeypatch.setattr(cost_curve, "cpu_identity", lambda: "another-cpu")
    backend = KeyedToy()
    assert cost_curve.load_or_measure(backend) is not None
    assert backend.all_forward_sizes  # measured, not read from the first CPU's file
    assert len(list((cache / "costs").glob("toy-costs-test-cpu*.json"))) == 2
    monkeypatch.setattr(cost_curve, "cpu_identity", this_cpu)
    backend = KeyedToy()
    assert cost_curve.load_or_measure(backend) == curve
    assert not backend.all_forward_sizes  # this CPU's file was read back


def test_a_damaged_cache_file_is_measured_again(cache) -> None:
    path = cost_curve.cache_path("toy-costs-test")
    path.parent.mkdir(parents=True)
    path.write_text('{"seconds": {"1": "fast"')
    curve = cost_curve.load_or_measure(KeyedToy())
    assert curve is not None and 8 in curve
    assert json.loads(path.read_text())["seconds"]["8"] == curve[8]


def test_a_backend_without_a_key_learns_online_only(cache) -> None:
    assert cost_curve.load_or_measure(ToyBackend()) is None
    assert not (cache / "costs").exists()


def test_the_engine_measures_once_and_hands_the_curve_to_cost_aware_only(monkeypatch) -> None:
    calls = []
    real = cost_curve.load_or_measure
    monkeypatch.setattr(
        cost_curve, "load_or_measure", lambda backend: calls.append(backend) or real(backend)
    )
    engine = Engine(KeyedToy(vocab_size=8))
    sampling = SamplingParams(max_new_tokens=12)
    for controller in ("cost-aware", "heuristic", "cost-aware"):
        spec = SpecConfig("prompt-lookup", controller=controller)
        engine.generate([1, 2, 3, 1, 2], sampling, spec)
    assert len(calls) == 1
