"""Speculative decoding: pure accept/reject math, draft-length policies and counters (no Ray, no I/O).

Terms, used with these meanings everywhere in the project:
- *draft tokens*: the k tokens the drafter proposes in one round, d_1..d_k.
- *accepted tokens*: the longest prefix d_1..d_n of the draft that the verifier keeps (0 <= n <= k).
- *rejected token*: d_{n+1}, the first draft token the verifier does not keep (only when n < k).
- *correction token*: the verifier's replacement for the rejected token (greedy: its argmax; sampling:
  a draw from the residual max(0, p - q) renormalised).
- *bonus token*: when all k draft tokens are accepted, the verifier's own next token after d_k, free
  from the same forward pass.
- *output tokens* of a round: the accepted tokens followed by the correction or bonus token, so every
  round emits between 1 and k+1 tokens.
- *acceptance rate*: accepted / drafted tokens (vLLM's definition); *alpha*: the per-position
  probability that a draft token is accepted given that all before it were, estimated as
  accepted / (accepted + rejected). The cost model uses alpha.
"""
