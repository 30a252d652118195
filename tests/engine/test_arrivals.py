"""Requests arriving over time: none starts before it arrives, and timestamps share the engine clock."""

from llmopt.engine import EngineConfig, LLMEngine, SamplingParams


class FakeClock:
    """Deterministic time: each call advances 1 ms; sleeping is not needed when time always moves."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def test_late_request_starts_after_it_arrives(llama64, prompts):
    clock = FakeClock()
    engine = LLMEngine(llama64, EngineConfig(kv_budget=10 ** 7), clock=clock)
    early = engine.add(prompts([10])[0], SamplingParams(max_tokens=5, ignore_eos=True), arrival=0.0)
    late = engine.add(prompts([12], seed=1)[0], SamplingParams(max_tokens=5, ignore_eos=True), arrival=0.02)
    engine.run()
    assert late.token_times[0] > 0.02
    assert early.token_times[0] < late.token_times[0]
    assert all(b >= a for s in (early, late) for a, b in zip(s.token_times, s.token_times[1:]))
