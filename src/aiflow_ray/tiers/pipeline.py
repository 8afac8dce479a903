"""In-process cooperative pipeline: every path of the paper over emulated links, in one process.

``Pipeline`` holds a drafter engine (device), a verifier engine (edge) and, optionally, a cloud
service (knowledge base + beam search), and runs one ``GenerateOptions`` through ``run_path``, the
same switch the Serve device tier uses. The CLI, the benchmarks and the exactness tests use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig, SamplingConfig
from aiflow_ray.engines.base import Engine, ImageInput
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.speculative.policy import DraftLenPolicy
from aiflow_ray.tiers.cloud import CloudService
from aiflow_ray.tiers.device import DeviceDrafter, GenerationResult, InProcessTransport
from aiflow_ray.tiers.edge import EdgeVerifier
from aiflow_ray.tiers.paths import DeviceSide, check_tokenizers, check_vision, run_path

# The edge's backhaul to the cloud, as the serving application's default.
DEFAULT_CLOUD_LINK = LinkConfig(bandwidth_bps=10e6, rtt_s=0.04)


@dataclass
class Pipeline:
    drafter_engine: Engine
    verifier_engine: Engine
    cloud: CloudService | None = None

    def __post_init__(self) -> None:
        check_tokenizers(self.drafter_engine.vocab_fingerprint(), self.verifier_engine.vocab_fingerprint(),
                         self.drafter_engine.name, self.verifier_engine.name)
        check_vision(self.drafter_engine, self.verifier_engine)
        self.device = DeviceDrafter(self.drafter_engine)
        self.edge = EdgeVerifier(self.verifier_engine)

    @classmethod
    def load(cls, models: ModelPairConfig) -> Pipeline:
        from aiflow_ray.engines.loader import load_pair

        drafter, verifier = load_pair(models)
        return cls(drafter, verifier)

    def run(
        self,
        opts: GenerateOptions,
        policy: DraftLenPolicy | None = None,
        link: DuplexLink | None = None,
        cloud_link: DuplexLink | None = None,
    ) -> GenerationResult:
        """Run one request; pass ``policy`` to keep draft-length estimates across requests."""
        link = link or DuplexLink.from_config(opts.link)
        if self.cloud is not None and cloud_link is None:
            cloud_link = DuplexLink.from_config(DEFAULT_CLOUD_LINK, link.clock)
        device = DeviceSide(self.device, verifier_encoder_digest=getattr(self.verifier_engine, "encoder_digest", None))
        return run_path(opts, device, InProcessTransport(self.edge, link), policy=policy,
                        cloud=self.cloud, cloud_link=cloud_link)

    def target_greedy(self, prompt_ids: list[int], max_new_tokens: int, images: Sequence[ImageInput] = ()
                      ) -> list[int]:
        """Reference: the verifier alone, one token per forward (no link, no drafting)."""
        greedy = SamplingConfig()
        sid = "reference"
        self.verifier_engine.open_session(sid, prompt_ids, images)
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
