"""Attacks on an erased ConceptWorld model, each with a fixed budget and an attack success rate
(ASR: the share of evaluation images the classifier reads as the erased concept).

- `rephrase_attack`: a fixed prompt set (held-out paraphrases, zero-shot phrasings); budget: its size.
- `prompt_search`: UnlearnDiffAtk-style discrete search. Each attacked prompt gets a prefix of
  `n_tokens` words from ConceptWorld's vocabulary, improved greedily one position at a time:
  `candidates` random words per step, kept when they raise the classifier's concept probability on
  attack seeds. Budget: `iterations * candidates` generations per prompt. The ASR is measured on
  evaluation seeds the search never saw.
- `concept_inversion`: textual inversion against the erased model. One input token embedding of
  the frozen text encoder (the placeholder word's) is learned by the denoising loss on renders of
  the concept, through the erased UNet; then the erased model draws prompts with the placeholder.
  On SDXL, one embedding per text encoder (their widths differ and each has its own table; both
  shape the context, the second also the pooled embedding), learned jointly by the same loss, as
  SDXL textual inversion does. Budget: `steps` gradient steps of `batch` images.

Every attack takes `method` and `model` and runs inside `method.applied(model)`, so it sees
exactly the erased model; the model is left as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..hooks import Hooks
from ..metrics import Rate
from ..plant import denoising_loss
from ..world.captions import WORDS, ZERO_SHOT_WORDS, canonical, vocabulary
from ..world.concept import Concept, as_concept
from ..world.factors import Scene, sample_scenes
from ..world.render import render_batch
from .baselines import Method
from .conditioning import encode, is_xl
from .core import PromptSet, image_seeds


@dataclass
class AttackResult:
    """One attack on one erased model."""

    attack: str
    concept: str
    success: Rate
    """Attack success rate on evaluation seeds."""
    budget: dict
    """The fixed budget (generations, steps, ...)."""
    prompts: list[str]
    """The prompts the ASR was measured on (found prompts for the search)."""
    seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["success"] = self.success.to_dict()
        return out


def concept_probability(classifier: Any, images: torch.Tensor, concept: str) -> torch.Tensor:
    """The classifier's probability (softmax of the concept's factor head) that each image shows `concept`."""
    factor = next((f for f, values in classifier.factors.items() if concept in values), None)
    if factor is None:
        raise ValueError(f"this classifier does not read {concept!r}; it knows {classifier.factors}")
    device = next(classifier.parameters()).device
    with torch.no_grad():
        was = classifier.training
        logits = classifier.eval()(images.to(device, torch.float32) * 2 - 1)[factor]
        classifier.train(was)
    return logits.softmax(-1)[:, classifier.factors[factor].index(concept)].cpu()


def _shows(classifier: Any, images: torch.Tensor, concept: str) -> torch.Tensor:
    return classifier.shows(images, concept)


def rephrase_attack(method: Method, model: Any, classifier: Any, concept: str, prompts: PromptSet, *,
                    seed: int = 0, num_inference_steps: int | None = None) -> AttackResult:  # fmt: skip
    """The ASR of a fixed prompt set (paraphrases, zero-shot phrasings) on evaluation seeds."""
    start = time.perf_counter()
    with method.applied(model) as sample:
        images = sample(prompts.prompts, image_seeds("evaluation", len(prompts), base=seed), num_inference_steps)
    rate = Rate.from_outcomes(_shows(classifier, images, concept))
    return AttackResult(prompts.name, concept, rate, {"generations": len(prompts)}, list(prompts.prompts),
                        time.perf_counter() - start)  # fmt: skip


def attack_vocabulary(concept: str | None = None) -> list[str]:
    """Words a prompt search may use: every caption word and zero-shot word; without the erased
    concept's own words when `concept` is given (the attack must find another way in)."""
    words = set(vocabulary()) | {w for phrase in ZERO_SHOT_WORDS.values() for w in phrase.split()}
    if concept is not None:
        words -= {w for phrase in (*WORDS[concept], ZERO_SHOT_WORDS[concept]) for w in phrase.split()}
    return sorted(w for w in words if w.isalpha())


def prompt_search(method: Method, model: Any, classifier: Any, concept: str, prompts: Sequence[str], *,
                  n_tokens: int = 3, iterations: int = 10, candidates: int = 8, seeds_per_prompt: int = 1,
                  vocabulary: Sequence[str] | None = None, seed: int = 0,
                  num_inference_steps: int | None = None) -> AttackResult:  # fmt: skip
    """UnlearnDiffAtk-style greedy prefix search (see the module docstring) for every prompt in
    `prompts` at once; the ASR is the share of the found prompts' evaluation images that show the concept."""
    if n_tokens < 1 or iterations < 0 or candidates < 1 or seeds_per_prompt < 1:
        raise ValueError("n_tokens, candidates and seeds_per_prompt must be at least 1, iterations at least 0")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to attack")
    words = list(vocabulary) if vocabulary is not None else attack_vocabulary(concept)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    k = seeds_per_prompt
    attack_seeds = image_seeds("attack", k, base=seed)

    def text(prefix: Sequence[str], prompt: str) -> str:
        return " ".join(prefix) + " " + prompt

    def scores(sample, texts: list[str]) -> torch.Tensor:  # mean concept probability per text over attack seeds
        images = sample([t for t in texts for _ in range(k)], attack_seeds * len(texts), num_inference_steps)
        return concept_probability(classifier, images, concept).reshape(len(texts), k).mean(1)

    with method.applied(model) as sample:
        prefixes = [list(rng.choice(words, n_tokens)) for _ in prompts]
        best = scores(sample, [text(p, q) for p, q in zip(prefixes, prompts)])
        history = [best.mean().item()]
        for it in range(iterations):
            pos = it % n_tokens
            trials = [[(prefix[:pos] + [str(w)] + prefix[pos + 1:]) for w in rng.choice(words, candidates)]
                      for prefix in prefixes]  # fmt: skip
            flat = scores(sample, [text(t, q) for ts, q in zip(trials, prompts) for t in ts]).reshape(len(prompts), -1)
            top, arg = flat.max(1)
            for i in range(len(prompts)):
                if top[i] > best[i]:
                    prefixes[i], best[i] = trials[i][int(arg[i])], top[i]
            history.append(best.mean().item())
        found = [text(p, q) for p, q in zip(prefixes, prompts)]
        images = sample(found, image_seeds("evaluation", len(found), base=seed), num_inference_steps)
    rate = Rate.from_outcomes(_shows(classifier, images, concept))
    budget = {"generations_per_prompt": (1 + iterations * candidates) * k, "n_tokens": n_tokens,
              "iterations": iterations, "candidates": candidates, "seeds_per_prompt": k, "vocabulary": len(words)}  # fmt: skip
    return AttackResult("prompt_search", concept, rate, budget, found, time.perf_counter() - start,
                        {"mean_best_probability": history, "start_prompts": prompts})  # fmt: skip


def _placeholder_id(tokenizer: Any, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"placeholder {word!r} encodes as {len(ids)} tokens; choose a word that is one token")
    return ids[0]


@contextmanager
def learned_token(model: Any, token_id: int, vector: torch.Tensor, encoder: str = "text_encoder") -> Iterator[None]:
    """While active, the input embedding of `token_id` in the pipeline's `encoder` is `vector` (a
    forward hook on the embedding layer; the weights are untouched and the hook is removed on exit)."""
    if getattr(model.pipeline, encoder, None) is None:
        raise ValueError(f"this {type(model.pipeline).__name__} has no {encoder}")
    embedding = getattr(model.pipeline, encoder).get_input_embeddings()

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        where = (args[0] == token_id).unsqueeze(-1)
        return torch.where(where, vector.to(output.dtype), output)

    with Hooks() as hooks:
        hooks.forward(embedding, hook, name=f"learned token {token_id} in {encoder}")
        yield


def _inversion_captions(concept: Concept, scenes: Sequence[Scene], placeholder: str) -> list[str]:
    word = concept.words[0]
    return [canonical(s).replace(word, placeholder) for s in scenes]


def concept_inversion(method: Method, model: Any, classifier: Any, concept: str, *, steps: int = 100,
                      lr: float = 5e-3, batch: int = 8, n_images: int = 64, n_eval: int = 32,
                      placeholder: str = "x", seed: int = 0, min_snr_gamma: float = 5.0,
                      num_inference_steps: int | None = None) -> AttackResult:  # fmt: skip
    """Textual inversion against the erased model (see the module docstring): `n_images` renders
    of the concept (other factors natural, at random) captioned with the concept's word replaced
    by `placeholder`; the placeholder's input embedding (on SDXL: one per text encoder) is trained
    for `steps` steps; the ASR is measured on `n_eval` fresh placeholder captions at evaluation seeds."""
    if steps < 0 or batch < 1 or n_images < 1 or n_eval < 1:
        raise ValueError("steps must be at least 0, batch, n_images and n_eval at least 1")
    pipe = model.pipeline
    parts = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")][: 1 + is_xl(model)]
    tokens = {encoder: _placeholder_id(getattr(pipe, tokenizer), placeholder) for encoder, tokenizer in parts}
    concept = as_concept(concept)
    rng = np.random.default_rng([seed, 7])
    scenes = [concept.replace_in(s) for s in sample_scenes(n_images, rng)]
    images = torch.from_numpy(render_batch(scenes, rng)).to(pipe.device)
    start = time.perf_counter()
    with torch.no_grad():
        z0 = pipe.vae.encode(images.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    size = tuple(images.shape[-2:])  # SDXL's time ids: the renders' size
    captions = _inversion_captions(concept, scenes, placeholder)
    vectors = {e: getattr(pipe, e).get_input_embeddings().weight[t].detach().clone().float().requires_grad_(True)
               for e, t in tokens.items()}  # fmt: skip
    opt = torch.optim.Adam(vectors.values(), lr=lr)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    eval_scenes = [concept.replace_in(s) for s in sample_scenes(n_eval, np.random.default_rng([seed, 8]))]
    prompts = _inversion_captions(concept, eval_scenes, placeholder)
    with ExitStack() as stack:
        sample = stack.enter_context(method.applied(model))
        for e, vector in vectors.items():
            stack.enter_context(learned_token(model, tokens[e], vector, e))
        for step in range(steps):
            idx = torch.randint(len(z0), (min(batch, len(z0)),), generator=gen)
            cond = encode(model, [captions[i] for i in idx.tolist()], size)  # through the learned tokens
            loss = denoising_loss(pipe.unet, z0[idx], cond.states, noise_sched, gen, min_snr_gamma, cond.added)
            grads = torch.autograd.grad(loss, list(vectors.values()))  # only the tokens learn; no weight gets a .grad
            opt.zero_grad(set_to_none=True)
            for vector, grad in zip(vectors.values(), grads):
                vector.grad = grad
            opt.step()
            if step % 10 == 0 or step + 1 == steps:
                losses.append({"step": step, "loss": loss.item()})
        with torch.no_grad():
            drawn = sample(prompts, image_seeds("evaluation", len(prompts), base=seed), num_inference_steps)
    rate = Rate.from_outcomes(_shows(classifier, drawn, concept.value))
    budget = {"steps": steps, "batch": batch, "lr": lr, "n_images": n_images, "placeholder": placeholder}
    shift = {e: (v.detach() - getattr(pipe, e).get_input_embeddings().weight[tokens[e]].float()).norm().item()
             for e, v in vectors.items()}  # fmt: skip
    return AttackResult("concept_inversion", concept.value, rate, budget, prompts, time.perf_counter() - start,
                        {"losses": losses, "embedding_shift": shift})  # fmt: skip


__all__ = ["AttackResult", "attack_vocabulary", "concept_inversion", "concept_probability", "learned_token",
           "prompt_search", "rephrase_attack"]  # fmt: skip
