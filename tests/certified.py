"""The sampling check every drafter's tests share: `certify` at temperature 1 on a real model."""

from __future__ import annotations

from specdecode import SamplingParams, SpecConfig, SpecDecoder
from specdecode.certify import CertifyConfig, certify
from specdecode.cli import CERTIFY_PROMPT


def assert_certify_passes(llm: SpecDecoder, spec: SpecConfig) -> None:
    """`spec` keeps the model's next-token distributions (300 samples of each), with drafts
    proposed and judged; the engine's cross-request state is cleared first."""
    llm.engine.drafter_state.clear()
    prompt = llm.encode_prompt(CERTIFY_PROMPT, chat=False)
    sampling = SamplingParams(temperature=1.0)
    report = certify(llm.engine, prompt, sampling, spec, CertifyConfig(samples=300, seed=3))
    assert report.verdict == "PASS", report.summary()
    assert report.speculative_tokens_per_forward > 1.0  # drafts were proposed and judged
