"""llmopt's inference engine: paged KV cache, continuous batching with preemption, speculative decoding."""

from llmopt.engine.engine import EngineConfig, KVStats, LLMEngine, generate
from llmopt.engine.sampling import SamplingParams
from llmopt.engine.sequence import Sequence

__all__ = ["EngineConfig", "KVStats", "LLMEngine", "SamplingParams", "Sequence", "generate"]
