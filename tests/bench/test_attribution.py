"""Attribution patching: exact on a model linear in the site's activations, and a denoising loop
that reproduces `generate`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from acterase_interp.bench.attribution import LoopSettings, Rows, attribution_patching, concept_logit, denoise
from acterase_interp.generation import generate
from acterase_interp.patching import hook_site
from acterase_interp.sites import Site

SITE = Site("toy.mix", "ffn_out", "toy", "mix", "output", None, (4, 5))
SETTINGS = LoopSettings(num_inference_steps=5, guidance_scale=3.0, height=2, width=2)
PAIRS = [("t one", "s one"), ("t two", "s two"), ("t three", "s three")]


class _Mix(nn.Module):
    """The site: affine in the latent plus a text term, so a_source - a_target is the same on any latent."""

    def __init__(self) -> None:
        super().__init__()
        self.latent, self.text = nn.Linear(2, 5), nn.Linear(3, 5, bias=False)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.latent(x) + self.text(text).mean(1, keepdim=True)


class _UNet(nn.Module):
    config = SimpleNamespace(in_channels=2, time_cond_proj_dim=None)

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.out = _Mix(), nn.Linear(5, 2)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        b, c, h, w = sample.shape
        y = self.out(self.mix(sample.flatten(2).transpose(1, 2), encoder_hidden_states))
        return (y.transpose(1, 2).reshape(b, c, h, w),)


class _VAE(nn.Module):
    config = SimpleNamespace(scaling_factor=1.0)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def decode(self, z, return_dict=False, generator=None):
        return (1e-3 * self.conv(z),)  # small: postprocess's clamp to [0, 1] never binds


class _Classifier(nn.Module):
    factors = {"shape": ("heart", "circle")}

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(12, 2)

    def forward(self, images):
        return {"shape": self.head(images.flatten(1))}


class _Pipe:
    """A linear stand-in for a StableDiffusionPipeline: everything `denoise` touches."""

    vae_scale_factor = 1

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.unet, self.vae = _UNet(), _VAE()
        self.scheduler = DPMSolverMultistepScheduler()
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @staticmethod
    def _embed(prompt: str) -> torch.Tensor:
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(sum(map(ord, prompt))))

    def encode_prompt(self, prompts, device, n, cfg, negative=None):
        cond = torch.stack([self._embed(p) for p in prompts])
        return cond, torch.stack([self._embed("") for _ in prompts]) if cfg else None


def _logit(pipe, classifier, seeds, patch_unit=None):
    """Summed concept logit of the targets, with unit `patch_unit` of the target rows set to the
    source rows' value at every step."""
    rows = Rows(len(PAIRS), True, True)

    def patch(x):
        y = x.clone()
        y[rows.prompts, :, patch_unit] = x[rows.readers_slice, :, patch_unit]
        return y

    handle = hook_site(pipe, SITE, patch) if patch_unit is not None else None
    try:
        with torch.no_grad():
            images = denoise(pipe, [t for t, _ in PAIRS], seeds, SETTINGS, readers=[s for _, s in PAIRS])
    finally:
        if handle is not None:
            handle.remove()
    assert 0 < images.min() and images.max() < 1  # the linear regime: no clamping
    return concept_logit(classifier, images, "heart").sum().item()


def test_atp_equals_the_patching_effect_on_a_linear_model():
    pipe, classifier, seeds = _Pipe(), _Classifier(), [3, 4, 5]
    scores = attribution_patching(pipe, classifier, "heart", PAIRS, seeds, [SITE], SETTINGS, batch_size=2,
                                  progress=False)["toy.mix"]  # fmt: skip
    clean = _logit(pipe, classifier, seeds)
    effects = torch.tensor([_logit(pipe, classifier, seeds, u) - clean for u in range(5)])
    # score = the predicted drop of the logit per pair; the effect is the summed change
    torch.testing.assert_close(scores, -effects / len(PAIRS), rtol=1e-4, atol=1e-6)
    assert (effects.abs() > 100 * 1e-6).all()  # every effect far above atol: the check is not 0 == 0


def test_atp_rejects_bad_input():
    pipe, classifier = _Pipe(), _Classifier()
    with pytest.raises(ValueError, match="one seed per pair"):
        attribution_patching(pipe, classifier, "heart", PAIRS, [0], [SITE], SETTINGS, progress=False)
    with pytest.raises(ValueError, match="no sites"):
        attribution_patching(pipe, classifier, "heart", PAIRS, [0, 1, 2], [], SETTINGS, progress=False)
    with pytest.raises(ValueError, match="does not read"):
        concept_logit(classifier, torch.zeros(1, 3, 2, 2), "cyan")


def test_denoise_matches_generate(conceptworld):
    prompts = ["a red heart on a plain background", "a blue circle on dots"]
    expected = generate(conceptworld, prompts, seeds=[3, 4], progress=False)
    settings = LoopSettings.of(conceptworld)
    with torch.no_grad():
        plain = denoise(conceptworld.pipeline, prompts, [3, 4], settings).float().cpu()
        read = denoise(conceptworld.pipeline, prompts, [3, 4], settings, readers=prompts[::-1]).float().cpu()
    assert torch.equal(plain, expected)  # the same steps in the same order: bit-identical
    assert torch.equal(read, expected)  # reader rows change nothing in the sampled rows


def test_atp_matches_a_finite_difference_on_conceptworld(conceptworld, conceptworld_sites, classifier):
    """The directional derivative along (a_s - a_t) at one site and every step, by central
    differences on the real model, equals the AtP sum (the model is not linear: 2% tolerance; the
    gap shrinks with eps, 1.8% at 1e-2, 0.2% at 1e-3)."""
    pipe, settings = conceptworld.pipeline, LoopSettings.of(conceptworld, num_inference_steps=6)
    site = next(s for s in conceptworld_sites if s.name == "up.0.0.ffn_hidden")
    pairs = [("a red heart on a plain background", "a red circle on a plain background")]
    atp = attribution_patching(pipe, classifier, "heart", pairs, [0], [site], settings, progress=False)[site.name]
    rows = Rows(1, True, True)

    def logit(eps: float) -> float:
        def fn(x):
            y = x.clone()
            y[rows.prompts] = x[rows.prompts] + eps * (x[rows.readers_slice] - x[rows.prompts])
            return y

        handle = hook_site(pipe, site, fn)
        try:
            with torch.no_grad():
                images = denoise(pipe, [pairs[0][0]], [0], settings, readers=[pairs[0][1]])
        finally:
            handle.remove()
        return concept_logit(classifier, images, "heart").item()

    eps = 1e-3
    derivative = (logit(eps) - logit(-eps)) / (2 * eps)
    assert -atp.sum().item() == pytest.approx(derivative, rel=0.02)  # measured: -4.530 vs -4.541
