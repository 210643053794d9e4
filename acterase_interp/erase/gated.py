"""A gated subspace eraser, beyond the paper: at every cross-attention key and value, the text
tokens that look like the concept have their concept subspace replaced by the benign value, and
every other token passes untouched.

ActErase replaces masked units for every prompt, so on concepts that enter through the text path
it erases everything or nothing. Here the edit is conditional (as CASteer's is, and as
replacement rather than steering). Fitted on the prompt pairs alone, with no denoising loop: keys
and values are functions of the text, the same at every step.

- **Concept tokens**: the tokens of each target that its source does not share (a token-level
  diff of the pair); their counterparts are the source tokens that replace them.
- Per site: the **basis** Q (units, r), the top-r right singular vectors of (concept-token row minus
  the mean of its counterparts' rows); the **benign** coordinates c, the counterparts' mean
  coordinates; the **gate direction** u, the mean coordinate difference, normalised.
- The **threshold**: the largest score (x Q - c) . u that any token of the sources reaches, both
  guidance halves and every position, plus `margin` times the gap up to the smallest concept-token
  score. No fit source token is edited. The targets' other tokens are not on the benign side:
  a bidirectional text encoder mixes the concept into every token of a prompt that names it.

Applied, per token row x of a site: where (x Q - c) . u > threshold, x <- x - (x Q - c) Q^T (its
coordinates in Q set to c); elsewhere x as it is, and a call where nothing passes the gate returns
its input itself, so prompts without the concept give bit-identical images.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..integrity import SHA256, file_hashes, load_tensors, malformed
from ..io import atomic_save_safetensors, atomic_write_dir, atomic_write_json
from ..loading import architecture_hash
from ..patching import from_tokens, patch_in_trace, patched, to_tokens, unet_of
from ..provenance import library_versions
from ..sites import Site, is_dit
from ._util import model_sites, read_manifest, site_from_dict, site_to_dict
from .pairs import PromptPairs
from .select import SELECT_SEED_OFFSET

FORMAT = "acterase-gated-eraser/1"
MANIFEST = "gated_eraser.json"
TENSORS = "gates.safetensors"
KINDS = ("attn2_k", "attn2_v")
PARTS = ("basis", "benign", "direction", "threshold")
SCOPES = ("token", "prompt")
"""What a passed gate edits: the token rows that pass, or every token row of a prompt with one that passes."""


@dataclass(frozen=True, eq=False)
class GatedEraser:
    """Per site: `basis` (units, r), `benign` (r,), `direction` (r,) and `threshold` (a 0-d tensor)."""

    sites: tuple[Site, ...]
    basis: dict[str, torch.Tensor] = field(repr=False)
    benign: dict[str, torch.Tensor] = field(repr=False)
    direction: dict[str, torch.Tensor] = field(repr=False)
    threshold: dict[str, torch.Tensor] = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)

    def __post_init__(self) -> None:
        if "architecture_hash" not in self.manifest:
            raise ValueError("a gated eraser's manifest needs the architecture_hash of its model")
        for s in self.sites:
            parts = [getattr(self, p).get(s.name) for p in PARTS]
            if any(t is None for t in parts):
                raise ValueError(f"site {s.name!r} needs a basis, benign coordinates, a direction and a threshold")
            basis, benign, direction, threshold = parts
            if basis.ndim != 2 or benign.shape != (basis.shape[1],) or direction.shape != benign.shape or threshold.ndim:
                raise ValueError(f"site {s.name!r}: basis {tuple(basis.shape)}, benign {tuple(benign.shape)}, direction "
                                 f"{tuple(direction.shape)} and threshold {tuple(threshold.shape)} do not fit together")  # fmt: skip

    def __repr__(self) -> str:
        rank = max((b.shape[1] for b in self.basis.values()), default=0)
        return f"GatedEraser(concept={self.manifest.get('concept')!r}, sites={len(self.sites)}, rank={rank})"

    def gate(self, site_name: str, x: torch.Tensor) -> torch.Tensor:
        """Bool (batch, tokens): which token rows of the activation `x` the eraser edits."""
        return self._gated(site_name, to_tokens(x))[0]

    def _gated(self, site_name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate, the coordinates x Q - c and the basis Q, in the activation's dtype and device."""
        if site_name not in self.basis:
            raise KeyError(f"this gated eraser has no site {site_name!r}; it patches {[s.name for s in self.sites]}")
        basis = self.basis[site_name].to(tokens)
        coords = tokens @ basis - self.benign[site_name].to(tokens)
        return coords @ self.direction[site_name].to(tokens) > self.threshold[site_name].to(tokens), coords, basis

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        tokens = to_tokens(x)
        gate, coords, basis = self._gated(site_name, tokens)
        if not gate.any():
            return x
        edited = tokens - coords @ basis.T
        return from_tokens(torch.where(self.scoped(gate).unsqueeze(-1), edited, tokens), x.shape)

    def scoped(self, gate: torch.Tensor) -> torch.Tensor:
        """The token rows a gate (batch, tokens) edits under the eraser's scope: those that pass, or,
        with scope "prompt", every token of a prompt with one that passes."""
        return gate.any(-1, keepdim=True).expand_as(gate) if self.manifest.get("scope") == "prompt" else gate

    @contextmanager
    def applied(self, model: Any) -> Iterator[GatedEraser]:
        """Switch the eraser on for `model` inside the `with` block (torch hooks, `patching.patched`)."""
        with patched(model, self.to(unet_of(model).device)):
            yield self

    def apply(self, model: Any, step: int | None = None) -> None:
        """Patch every site inside a running nnsight trace at one step (`patching.patch_in_trace`)."""
        patch_in_trace(model, self, step)

    def to(self, device: str | torch.device) -> GatedEraser:
        return replace(self, **{p: {k: v.to(device) for k, v in getattr(self, p).items()} for p in PARTS})

    def check_model(self, model: Any) -> None:
        """Clear error unless `model` has the fitted architecture and every site of the eraser."""
        got, want = architecture_hash(getattr(model, "pipeline", model)), self.manifest["architecture_hash"]
        if got != want:
            raise ValueError(f"this gated eraser was fitted on a model with architecture hash {want}, but this model's "
                             f"is {got}: an eraser only applies to the architecture it was fitted on")  # fmt: skip
        known = {s.name: s.module_path for s in model_sites(model)}
        if missing := [s.name for s in self.sites if known.get(s.name) != s.module_path]:
            raise ValueError(f"sites {missing} do not exist in this model")

    def save(self, path: str | os.PathLike) -> None:
        """Write the eraser to a folder, atomically: the tensors as safetensors, the manifest as JSON."""
        tensors = {f"{n}/{p}": getattr(self, p)[n].contiguous() for n in self.basis for p in PARTS}

        def write(folder: Path) -> None:
            atomic_save_safetensors(tensors, folder / TENSORS)
            manifest = {"format": FORMAT, **self.manifest, "sites": [site_to_dict(s) for s in self.sites]}
            manifest[SHA256] = file_hashes(folder, (TENSORS,))
            atomic_write_json(manifest, folder / MANIFEST)

        atomic_write_dir(path, MANIFEST, write)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, *, verify: bool = True) -> GatedEraser:
        """An eraser written by `save`, its tensors checked against the recorded sha256 (unless
        `verify=False`); with `model`, checked against it and moved to its device."""
        folder = Path(path).expanduser()
        manifest = read_manifest(folder, MANIFEST, FORMAT, (TENSORS,), "gated eraser", verify)
        try:
            sites = tuple(site_from_dict(s) for s in manifest.pop("sites"))
            tensors = load_tensors(folder / TENSORS)
            parts = {p: {s.name: tensors[f"{s.name}/{p}"] for s in sites} for p in PARTS}
            eraser = cls(sites, manifest=manifest, **parts)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise malformed(folder / MANIFEST, "gated eraser manifest", err) from err
        if model is not None:
            eraser.check_model(model)
            eraser = eraser.to(unet_of(model).device)
        return eraser


# -- fitting --------------------------------------------------------------------------------------


def concept_tokens(target_ids: Sequence[int], source_ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The spans where a target's token ids differ from its source's: (target positions, source
    positions) per replaced or inserted span (a span the source only deletes has no target token)."""
    matcher = difflib.SequenceMatcher(a=list(target_ids), b=list(source_ids), autojunk=False)
    return [(list(range(i1, i2)), list(range(j1, j2))) for op, i1, i2, j1, j2 in matcher.get_opcodes()
            if op != "equal" and i2 > i1]  # fmt: skip


def _token_ids(model: Any, prompts: Sequence[str]) -> list[list[int]]:
    tokenizer = model.pipeline.tokenizer
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def _spans(model: Any, pairs: PromptPairs) -> list[tuple[list[int], list[int], int]]:
    """(target positions, source positions, pair index) of every concept span that its source replaces."""
    spans = [(t, s, i) for i, (tid, sid) in enumerate(zip(_token_ids(model, pairs.targets), _token_ids(model, pairs.sources)))
             for t, s in concept_tokens(tid, sid) if s]  # fmt: skip
    if not spans:
        raise ValueError("no pair differs in a token that its source replaces: the targets and sources must differ "
                         "where the concept is named")  # fmt: skip
    return spans


def _site_rows(model: Any, prompts: Sequence[str], sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """Each site's activation (halves, prompts, tokens, units) at the first step (keys and values
    do not change with the step), both guidance halves, unconditional first."""
    from ..evaluation.method import per_image, read_sites  # the one reading path of the baselines

    rows = read_sites(model, prompts, sites, lambda x, n: per_image(x.float(), n), seed=0, num_inference_steps=1, steps=1)
    return {k: v[0] for k, v in rows.items()}


def fit_gated(model: Any, pairs: PromptPairs, *, kinds: Sequence[str] = KINDS, rank: int = 4,
              margin: float = 0.0, scope: str = "token") -> GatedEraser:  # fmt: skip
    """The gated eraser of `pairs` at every site of `kinds` (see the module docstring); `rank` is
    the subspace dimension, `margin` in [0, 1) moves the threshold from the largest source score
    towards the smallest concept-token score."""
    from ..evaluation.method import sites_of_kind

    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if is_dit(unet_of(model)):
        raise ValueError("the gated eraser reads cross-attention keys and values; a diffusion transformer has none")
    order = [s.name for s in model_sites(model)]
    sites = sorted((s for kind in kinds for s in sites_of_kind(model, kind)), key=lambda s: order.index(s.name))
    if not sites:
        raise ValueError(f"this model has no sites of kinds {list(kinds)}")
    spans = _spans(model, pairs)
    targets, sources = _site_rows(model, pairs.targets, sites), _site_rows(model, pairs.sources, sites)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    for site in sites:
        cond_t, cond_s = targets[site.name][-1], sources[site.name][-1]
        concept = torch.cat([cond_t[i, t] for t, _, i in spans])
        counterpart = torch.cat([cond_s[i, s].mean(0, keepdim=True).expand(len(t), -1) for t, s, i in spans])
        basis = torch.linalg.svd(concept - counterpart, full_matrices=False).Vh[:rank].T.contiguous()
        benign = (counterpart @ basis).mean(0)
        direction = ((concept - counterpart) @ basis).mean(0)
        direction = direction / direction.norm().clamp_min(1e-12)
        source_scores = ((sources[site.name] @ basis - benign) @ direction).flatten()
        concept_scores = (concept @ basis - benign) @ direction
        low, high = source_scores.max(), concept_scores.min()
        threshold = low + margin * (high - low).clamp_min(0)
        for p, v in zip(PARTS, (basis, benign, direction, threshold)):
            parts[p][site.name] = v.detach().clone()
    manifest = {"architecture_hash": architecture_hash(model.pipeline), "concept": pairs.concept,
                "kinds": list(kinds), "rank": rank, "margin": margin, "scope": scope, "n_pairs": len(pairs.targets),
                "concept_tokens": sum(len(t) for t, _, _ in spans), "versions": library_versions()}  # fmt: skip
    return GatedEraser(tuple(sites), manifest=manifest, **parts)


def _conditional_rows(model: Any, eraser: GatedEraser, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each site's conditional rows (prompts, tokens, units) of `prompts`."""
    if not prompts:
        raise ValueError("no prompts given")
    return {name: rows[-1] for name, rows in _site_rows(model, list(prompts), eraser.sites).items()}


def gate_scores(model: Any, eraser: GatedEraser, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per site, every token's gate score (x Q - c) . u on the conditional rows, (prompts, tokens)
    (keys and values are the same at every step); a token passes where it exceeds the site's threshold."""
    coords = {name: eraser._gated(name, x)[1] for name, x in _conditional_rows(model, eraser, prompts).items()}
    return {name: c @ eraser.direction[name].to(c) for name, c in coords.items()}


def fit_recall(model: Any, eraser: GatedEraser, pairs: PromptPairs) -> dict[str, float]:
    """Per site, the share of the fit pairs' concept tokens (conditional rows) that its gate passes.
    The threshold is the largest score of any source token, other factors' words included, so a
    site whose gate passes none of them (recall 0) never edits even the words it was fitted on."""
    spans = _spans(model, pairs)
    gates = {name: eraser.gate(name, x) for name, x in _conditional_rows(model, eraser, pairs.targets).items()}
    return {name: float(torch.cat([gate[i, t] for t, _, i in spans]).float().mean()) for name, gate in gates.items()}


def gate_coverage(model: Any, eraser: GatedEraser, prompts: Sequence[str]) -> torch.Tensor:
    """Bool (sites, prompts): whether any token of each prompt passes each site's gate, on the
    conditional rows (keys and values are the same at every step). A prompt the eraser misses may
    pass no gate at all, or pass at some sites and reach the image through the others."""
    rows = _conditional_rows(model, eraser, prompts)
    return torch.stack([eraser.gate(s.name, rows[s.name]).any(-1) for s in eraser.sites])


def with_scope(eraser: GatedEraser, scope: str) -> GatedEraser:
    """The same gates with another `scope` (`SCOPES`)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return replace(eraser, manifest={**eraser.manifest, "scope": scope})


def choose_scope(model: Any, eraser: GatedEraser, pairs: PromptPairs, shows_concept: Callable[[torch.Tensor], torch.Tensor],
                 *, seed: int = 0, num_inference_steps: int | None = None) -> tuple[GatedEraser, dict[str, float]]:  # fmt: skip
    """The scope whose eraser leaves the concept in the fewest of the fit targets' images (seeds
    as `choose_tau`'s: the fit side only), "token" on a tie (the lighter edit); with each scope's rate."""
    from ..generation import generate

    seeds = [seed + SELECT_SEED_OFFSET + k for k in range(len(pairs.targets))]
    rates = {}
    for scope in SCOPES:
        with with_scope(eraser, scope).applied(model):
            images = generate(model, list(pairs.targets), seeds=seeds, num_inference_steps=num_inference_steps, progress=False)
        rates[scope] = float(shows_concept(images).sum()) / len(images)
    best = min(SCOPES, key=lambda scope: rates[scope])  # min keeps the first of equals: "token"
    return with_scope(eraser, best), rates


__all__ = ["GatedEraser", "choose_scope", "concept_tokens", "fit_gated", "fit_recall", "gate_coverage", "gate_scores",
           "with_scope"]
