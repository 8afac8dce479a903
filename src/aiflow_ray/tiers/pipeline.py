"""In-process cooperative pipeline: the three paths of the paper over an emulated link.

``Pipeline`` holds a drafter engine (device) and a verifier engine (edge) and runs one
``GenerateOptions`` on the path it names. The Ray Serve deployments run the same tier classes in
separate replicas; this module is what the CLI and the benchmarks use.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiflow_ray.config import GenerateOptions, ModelPairConfig
from aiflow_ray.engines.base import Engine
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.speculative.policy import DraftLenPolicy, make_policy
from aiflow_ray.tiers.device import DeviceDrafter, GenerationResult, InProcessTransport, generate_server_only
from aiflow_ray.tiers.edge import EdgeVerifier


@dataclass
class Pipeline:
    drafter_engine: Engine
    verifier_engine: Engine

    def __post_init__(self) -> None:
        self.device = DeviceDrafter(self.drafter_engine)
        self.edge = EdgeVerifier(self.verifier_engine)

    @classmethod
    def load(cls, models: ModelPairConfig) -> Pipeline:
        from aiflow_ray.models.loader import load_pair

        drafter, verifier = load_pair(models)
        return cls(drafter, verifier)

    def run(
        self,
        opts: GenerateOptions,
        policy: DraftLenPolicy | None = None,
        link: DuplexLink | None = None,
    ) -> GenerationResult:
        """Run one request; pass ``policy`` to keep draft-length estimates across requests."""
        if opts.path == "on-device":
            ids = self.drafter_engine.encode_prompt(opts.prompt_input(), opts.chat)
            return self.device.generate_local(ids, opts.max_new_tokens, opts.sampling)
        link = link or DuplexLink.from_config(opts.link)
        transport = InProcessTransport(self.edge, link)
        if opts.path == "server-only":
            return generate_server_only(
                opts.prompt_input(), opts.chat, opts.max_new_tokens, opts.sampling, transport,
                self.verifier_engine.decode,
            )
        ids = self.drafter_engine.encode_prompt(opts.prompt_input(), opts.chat)
        policy = policy or make_policy(opts.draft_policy(), 0 if opts.sampling.greedy else opts.sampling.draft_top_k)
        return self.device.generate_speculative(ids, opts.max_new_tokens, opts.sampling, policy, transport)

    def target_greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Reference: the verifier alone, one token per forward (no link, no drafting)."""
        from aiflow_ray.config import SamplingConfig

        greedy = SamplingConfig()
        sid = "reference"
        self.verifier_engine.open_session(sid, prompt_ids)
        out: list[int] = []
        try:
            for _ in range(max_new_tokens):
                scores = self.verifier_engine.score(sid, [], greedy)
                assert scores.greedy_ids is not None
                token = scores.greedy_ids[0]
                out.append(token)
                self.verifier_engine.append(sid, [token])
                if token in self.verifier_engine.eos_token_ids:
                    break
        finally:
            self.verifier_engine.release(sid)
        return out
