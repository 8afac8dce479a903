"""Training and evaluating the captioning pair (``vision/captioning.py`` holds its specs, ``vision/caption_pair.py``
builds and caches it).

The vision tower learns first, helped by two linear probes on its visual tokens that are never saved (which
item each cell holds, which cell each token is): without that direct signal a vision tower trained for minutes
on the caption loss alone learnt almost nothing. The captioners then learn with the loss on the caption only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from tqdm import tqdm

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.vision import scenes
from aiflow_ray.vision.captioning import (
    DOWNSAMPLE_RATIO,
    ENDOFTEXT,
    EVAL_SCENES,
    EVAL_SEED,
    IM_END,
    MAX_CAPTION_TOKENS,
    PATCH_SIZE,
    TOKENS_PER_IMAGE,
    TrainSpec,
    _id,
    pixel_values,
    prompt_ids,
    target_ids,
)
from aiflow_ray.vision.scenes import TILE_SIZE, Scene

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast

log = get_logger(__name__)


def _batches(source: Sequence[Scene] | int, batch_size: int) -> Iterator[list[Scene]]:
    """Batches from a fixed pool (cycled in order) or, for an int seed, an endless stream of fresh scenes."""
    if isinstance(source, int):
        stream = scenes.iter_scenes("train", source)
        while True:
            yield [next(stream) for _ in range(batch_size)]
    start = 0
    while True:
        yield [source[(start + i) % len(source)] for i in range(batch_size)]
        start += batch_size


def _batch_tensors(
    tokenizer: PreTrainedTokenizerFast, prompt: Sequence[int], batch: Sequence[Scene],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels aligned with the logits that predict them), right-padded."""
    import torch

    targets = [target_ids(tokenizer, scene.caption) for scene in batch]
    width = len(prompt) + max(len(t) for t in targets)
    ids = torch.full((len(batch), width), _id(tokenizer, ENDOFTEXT), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, target in enumerate(targets):
        sequence = [*prompt, *target]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        # The logit at position i predicts token i + 1; right padding never affects earlier positions.
        labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(target)
    return ids, labels


def visual_token_cells(model: InternVLForConditionalGeneration) -> list[int]:
    """The scene cell (index into ``scenes.POSITIONS``) of each visual token, in prompt order: pixel shuffle
    reorders patches, so this runs it on a grid of cell indices rather than trusting its layout."""
    import torch

    grid = TILE_SIZE // PATCH_SIZE
    rows = torch.arange(grid).repeat_interleave(grid)  # patches come out of the tower row-major
    cols = torch.arange(grid).repeat(grid)
    cells = ((rows // (grid // 2)) * 2 + cols // (grid // 2)).float().reshape(1, grid, grid, 1)
    shuffled = model.model.pixel_shuffle(cells, scale_factor=DOWNSAMPLE_RATIO).reshape(TOKENS_PER_IMAGE, -1)
    if not bool((shuffled == shuffled[:, :1]).all()):
        raise RuntimeError("a visual token mixes patches of different cells")
    return [int(v) for v in shuffled[:, 0]]


class CellProbe:
    """Throw-away linear heads on the projected visual tokens, used in training only and never saved.

    One names each cell's item (or "empty") from the cell's tokens: learning to see through the caption
    loss alone is far too slow for a few minutes of CPU, while this direct signal makes the tokens tell their
    cell's item within a few hundred steps. The other names each token's cell from the token alone, so that
    a caption that has just written "in the top left" can find that cell's token by its content: the language
    model's rotary positions are relative, and the vision tower's position embeddings start at zero.
    """

    def __init__(self, model: InternVLForConditionalGeneration, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self.cells = torch.tensor(visual_token_cells(model))
        self.order = torch.argsort(self.cells, stable=True)  # tokens grouped by cell
        hidden = int(model.config.get_text_config().hidden_size)
        self.item_head = torch.nn.Linear(TOKENS_PER_IMAGE // len(scenes.POSITIONS) * hidden, 1 + len(scenes.CLASSES))
        self.cell_head = torch.nn.Linear(hidden, len(scenes.POSITIONS))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.item_head.parameters(), *self.cell_head.parameters()]

    def loss(self, visual: torch.Tensor, layouts: Sequence[scenes.Layout]) -> torch.Tensor:
        import torch

        cross_entropy = torch.nn.functional.cross_entropy
        logits = self.item_head(visual[:, self.order].reshape(len(layouts), len(scenes.POSITIONS), -1))
        targets = torch.zeros(len(layouts), len(scenes.POSITIONS), dtype=torch.long)
        for row, layout in enumerate(layouts):
            for placement in layout.placements:
                targets[row, placement.cell] = 1 + scenes.CLASSES.index(placement.label)
        item_loss = cross_entropy(logits.flatten(0, 1), targets.flatten())
        cell_loss = cross_entropy(self.cell_head(visual).flatten(0, 1), self.cells.repeat(len(layouts)))
        return item_loss + cell_loss


def _optimizer(params: Sequence[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.peak_lr, betas=(0.9, 0.98),
    )


def _lr_at(spec: TrainSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < spec.warmup_steps:
        return spec.peak_lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.peak_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _run_steps(
    spec: TrainSpec, params: Sequence[torch.nn.Parameter], loss_at: Callable[[int], dict[str, torch.Tensor]],
    desc: str,
) -> list[dict[str, float]]:
    """The shared loop: AdamW, warm-up and cosine schedule, clipping, a progress bar; returns per-step losses."""
    import torch

    optimizer = _optimizer(params, spec)
    history: list[dict[str, float]] = []
    with tqdm(total=spec.steps, desc=desc, unit="step") as bar:
        for step in range(spec.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(spec, step)
            losses = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # type: ignore[union-attr]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            history.append({name: value.item() for name, value in losses.items()})
            bar.update(1)
            if step % 10 == 0 or step == spec.steps - 1:
                recent = history[-10:]
                bar.set_postfix({name: f"{np.mean([h[name] for h in recent]):.3f}" for name in losses})
    return history


def train_vision(
    model: InternVLForConditionalGeneration, spec: TrainSpec, probe: CellProbe, desc: str = "vision",
) -> list[float]:
    """Warm up the vision tower and projector alone with the cell probe, on uncaptioned scenes of three or
    four items; returns the probe loss per step."""
    import torch

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng([spec.seed, 1])
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probe.parameters()]

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        # Three or four items: more items per step than captioned scenes, yet some empty cells to learn.
        layouts = [scenes.random_layout(rng, "train", items=int(rng.integers(3, 5))) for _ in range(spec.batch_size)]
        pixels = pixel_values([scenes.render(layout) for layout in layouts])
        visual = model.model.get_image_features(pixel_values=pixels).pooler_output
        return {"probe": probe.loss(visual, layouts)}

    model.train()
    history = _run_steps(spec, params, loss_at, desc)
    model.eval()
    return [h["probe"] for h in history]


def train_captioner(
    model: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    spec: TrainSpec,
    data: Sequence[Scene] | None = None,
    probe: CellProbe | None = None,
    desc: str = "caption",
) -> list[float]:
    """Train ``model``'s parameters that require grad to caption scenes; returns the caption loss per step.

    ``data`` is a fixed pool cycled in order; without it every step draws fresh training scenes. The loss is
    the caption's cross-entropy (prompt tokens excluded) plus, with a ``probe``, the probe's.
    """
    import torch

    torch.manual_seed(spec.seed)
    prompt = prompt_ids(tokenizer)
    image_token_id = model.config.image_token_id
    first = len(prompt) - 1  # no logits are needed for the prompt's earlier positions
    batches = _batches(data if data is not None else spec.seed, spec.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if probe is not None:
        params += probe.parameters()

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        batch = next(batches)
        ids, labels = _batch_tensors(tokenizer, prompt, batch)
        visual = model.model.get_image_features(pixel_values=pixel_values([s.image for s in batch])).pooler_output
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == image_token_id).unsqueeze(-1), visual.to(embeds.dtype))
        logits = model(inputs_embeds=embeds, logits_to_keep=ids.shape[1] - first).logits
        losses = {"caption": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, first:].flatten())}
        if probe is not None:
            losses["probe"] = probe.loss(visual, [s.layout for s in batch])
        return losses

    model.train()
    history = _run_steps(spec, params, loss_at, desc)
    model.eval()
    return [h["caption"] for h in history]


# -- evaluation --------------------------------------------------------------------------------------------


def greedy_outputs(
    model: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: Sequence[Image.Image],
    batch_size: int = 64,
    desc: str = "caption",
) -> list[list[int]]:
    """Greedy output ids per image, up to and including ``<|im_end|>`` (if produced in time)."""
    import torch

    prompt = prompt_ids(tokenizer)
    eos = _id(tokenizer, IM_END)
    pad = _id(tokenizer, ENDOFTEXT)
    out: list[list[int]] = []
    with torch.no_grad(), tqdm(total=len(images), desc=desc, unit="scene") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            ids = torch.tensor([prompt] * len(chunk))
            # GenerationMixin's self-type is not one mypy can match to this model class.
            generated = cast(Any, model).generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values(chunk),
                max_new_tokens=MAX_CAPTION_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
            for row in generated[:, len(prompt) :].tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
            bar.update(len(chunk))
    return out


def decode_caption(tokenizer: PreTrainedTokenizerFast, output: Sequence[int]) -> str:
    eos = _id(tokenizer, IM_END)
    body = list(output[:-1]) if output and output[-1] == eos else list(output)
    return str(tokenizer.decode(body, skip_special_tokens=False))


def caption_accuracy(
    tokenizer: PreTrainedTokenizerFast, outputs: Sequence[Sequence[int]], data: Sequence[Scene],
) -> float:
    """Exact match: the greedy output is the caption followed by ``<|im_end|>``."""
    hits = sum(list(out) == target_ids(tokenizer, scene.caption) for out, scene in zip(outputs, data, strict=True))
    return hits / len(data)


def token_agreement(
    drafter: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: Sequence[Image.Image],
    verifier_outputs: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> float:
    """Fraction of the verifier's output tokens that the drafter predicts greedily given the verifier's
    prefix (teacher-forced): the acceptance rate of greedy speculative decoding, token by token."""
    import torch

    prompt = prompt_ids(tokenizer)
    pad = _id(tokenizer, ENDOFTEXT)
    agreed = total = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs = verifier_outputs[start : start + batch_size]
            width = len(prompt) + max(len(o) for o in outputs)
            ids = torch.full((len(outputs), width), pad, dtype=torch.long)
            for row, output in enumerate(outputs):
                ids[row, : len(prompt) + len(output)] = torch.tensor([*prompt, *output])
            logits = drafter(input_ids=ids, pixel_values=pixel_values(images[start : start + batch_size])).logits
            guesses = logits.argmax(-1)
            for row, output in enumerate(outputs):
                predicted = guesses[row, len(prompt) - 1 : len(prompt) - 1 + len(output)].tolist()
                agreed += sum(p == t for p, t in zip(predicted, output, strict=True))
                total += len(output)
    return agreed / max(1, total)


def evaluate_pair(
    verifier: InternVLForConditionalGeneration,
    drafter: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    count: int = EVAL_SCENES,
    seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Greedy caption accuracy of both models and their token agreement on ``count`` held-out scenes."""
    data = scenes.make_split("test", count, seed)
    images = [scene.image for scene in data]
    verifier_outputs = greedy_outputs(verifier, tokenizer, images, desc="verifier eval")
    drafter_outputs = greedy_outputs(drafter, tokenizer, images, desc="drafter eval")
    metrics = {
        "eval_scenes": count,
        "eval_seed": seed,
        "verifier_accuracy": caption_accuracy(tokenizer, verifier_outputs, data),
        "drafter_accuracy": caption_accuracy(tokenizer, drafter_outputs, data),
        "token_agreement": token_agreement(drafter, tokenizer, images, verifier_outputs),
    }
    misses = [(scene.caption, decode_caption(tokenizer, out)) for out, scene in zip(verifier_outputs, data, strict=True)
              if list(out) != target_ids(tokenizer, scene.caption)]
    for want, got in misses[:5]:
        log.info("verifier miss: want %r got %r", want, got)
    return metrics


# -- the cached pair ---------------------------------------------------------------------------------------
