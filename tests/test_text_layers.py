"""Text-encoder layer injection (`generate(..., inject=TextLayerInjection(...))`) on ConceptWorld's
BERT, random-weight SD 1.5 / 2.1 and SDXL-tiny's CLIPs, with known answers: every later layer and
the UNet see only what the replaced layer outputs, so replacing a layer's output at every token is
the donor prompt's encoding, hence its image, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hook_count

from acterase_interp.generation import TextLayerInjection, generate
from acterase_interp.injection import encode_prompts
from acterase_interp.loading import GenerationDefaults, wrap
from acterase_interp.random_sd import build_random_sd
from acterase_interp.text_layers import encoder_layers, parse_text_layers, text_layers

STEPS = 3
TARGETS = ["a red triangle on a plain background", "a green circle on a dotted background"]
SOURCES = ["a red square on a plain background", "a blue star on a striped background"]  # same token counts
SUBJECT = 3
"""Token position of the subject word ("triangle" / "square") after the start token."""


def _images(model, prompts=TARGETS, inject: TextLayerInjection | None = None, steps: int = STEPS, **kw) -> torch.Tensor:
    return generate(model, prompts, seeds=0, num_inference_steps=steps, progress=False, inject=inject, **kw)


def _text_hooks(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.text_encoder.modules())


@pytest.fixture(scope="module")
def cw_images(conceptworld) -> dict[str, torch.Tensor]:
    return {"target": _images(conceptworld), "source": _images(conceptworld, SOURCES)}


def test_replacing_a_layer_at_every_token_is_the_source_image(conceptworld, cw_images):
    """ConceptWorld's UNet reads the BERT's last layer output: the last layer replaced is the source
    encoding; an earlier one too, since the later layers then compute from the source's states."""
    hooks = hook_count(conceptworld), _text_hooks(conceptworld.pipeline)
    last = len(encoder_layers(conceptworld.pipeline)) - 1
    assert last == 5  # all-MiniLM-L6-v2
    for layers in ([last], [2], [0, 4]):
        assert torch.equal(_images(conceptworld, inject=TextLayerInjection(SOURCES, layers)), cw_images["source"]), layers
    assert (hook_count(conceptworld), _text_hooks(conceptworld.pipeline)) == hooks  # nothing left behind
    assert (cw_images["source"] - cw_images["target"]).abs().max() > 1e-2


def test_no_layers_leave_the_target_image(conceptworld, cw_images):
    assert torch.equal(_images(conceptworld, inject=TextLayerInjection(SOURCES, ())), cw_images["target"])


def test_some_tokens_change_the_image_partly(conceptworld, cw_images):
    """The subject token alone at a middle layer: neither the target's image nor the source's."""
    partly = _images(conceptworld, inject=TextLayerInjection(SOURCES, [2], tokens=[SUBJECT]))
    assert (partly - cw_images["target"]).abs().max() > 1e-3 and (partly - cw_images["source"]).abs().max() > 1e-3


def test_at_the_last_layer_tokens_are_rows_of_the_encoding(conceptworld):
    """The last layer's output is the encoding: replacing tokens there swaps exactly those rows."""
    pipe = conceptworld.pipeline
    target, source = encode_prompts(pipe, TARGETS), encode_prompts(pipe, SOURCES)
    inject = TextLayerInjection(SOURCES, [5], tokens=[SUBJECT, 0])
    with inject.applied(pipe, SOURCES, TARGETS):
        swapped = encode_prompts(pipe, TARGETS)
    expected = target.clone()
    expected[:, [SUBJECT, 0]] = source[:, [SUBJECT, 0]]
    assert torch.equal(swapped, expected) and not torch.equal(swapped, target)


def test_only_the_targets_encoding_is_patched(conceptworld):
    """Inside the injection the negative prompt's encoding (a separate encoder call on "" ids) and
    any other prompt's are the unpatched ones, while the targets' in the same pipeline call are patched."""
    pipe = conceptworld.pipeline
    device = pipe._execution_device
    plain_cond, plain_uncond = pipe.encode_prompt(TARGETS, device, 1, True)
    other = ["a blue circle on a striped background"] * 2
    plain_other = encode_prompts(pipe, other)
    with TextLayerInjection(SOURCES, [5]).applied(pipe, SOURCES, TARGETS):
        cond, uncond = pipe.encode_prompt(TARGETS, device, 1, True)
        assert torch.equal(encode_prompts(pipe, other), plain_other)
    assert torch.equal(uncond, plain_uncond) and torch.equal(uncond, encode_prompts(pipe, ["", ""]))
    assert torch.equal(cond, encode_prompts(pipe, SOURCES)) and not torch.equal(cond, plain_cond)


def test_batches_inject_in_lockstep(conceptworld, cw_images):
    one_by_one = _images(conceptworld, inject=TextLayerInjection(SOURCES, [5]), batch_size=1)
    torch.testing.assert_close(one_by_one, cw_images["source"], atol=1e-5, rtol=0)  # batch-size rounding only


def test_layer_injection_errors(conceptworld):
    pipe = conceptworld.pipeline
    with pytest.raises(ValueError, match=r"text_encoder has 6 layers \(0 to 5\), got layer\(s\) \[6\]"):
        _images(conceptworld, inject=TextLayerInjection(SOURCES, [1, 6]))
    with pytest.raises(ValueError, match="2 source prompts to inject for 1 prompts"):
        _images(conceptworld, TARGETS[:1], TextLayerInjection(SOURCES, [5]))
    with pytest.raises(ValueError, match="2 donor prompts for 1 prompts"):
        TextLayerInjection(SOURCES, [5]).applied(pipe, SOURCES, TARGETS[:1]).__enter__()
    with pytest.raises(ValueError, match="no text encoder 'text_encoder_2'; it has \\['text_encoder'\\]"):
        _images(conceptworld, inject=TextLayerInjection(SOURCES, [0], encoder="text_encoder_2"))
    with pytest.raises(ValueError, match="unknown text encoder 'unet'"):
        TextLayerInjection(SOURCES, [0], encoder="unet")
    with pytest.raises(ValueError, match="token positions \\[30\\] are outside the encoder's 24 tokens"):
        _images(conceptworld, inject=TextLayerInjection(SOURCES, [5], tokens=[30]))
    for bad in ({"layers": [-1]}, {"layers": ["3"]}, {"layers": [0], "tokens": [True]}):
        with pytest.raises(ValueError, match="non-negative int"):
            TextLayerInjection(SOURCES, **{"layers": (), **bad})
    with pytest.raises(ValueError, match="source prompt"):
        TextLayerInjection([], [0])
    with pytest.raises(TypeError, match="knows CLIP and BERT"):
        encoder_layers(type("P", (), {"text_encoder": torch.nn.Linear(2, 2)})())
    assert TextLayerInjection("a red circle", 3).layers == (3,) and TextLayerInjection(SOURCES, [1], tokens=2).tokens == (2,)
    assert _text_hooks(pipe) == 0


def test_layer_names(conceptworld):
    assert text_layers(conceptworld.pipeline) == [f"text_encoder.{i}" for i in range(6)]
    assert parse_text_layers(("text_encoder.4", "text_encoder.5")) == ("text_encoder", (4, 5))
    assert parse_text_layers(["text_encoder_2.31"]) == ("text_encoder_2", (31,))
    for bad in ([], ["text.3"], ["text_encoder"], ["text_encoder.x"], ["up.1.0"]):
        with pytest.raises(ValueError, match="named <encoder>.<index>"):
            parse_text_layers(bad)
    with pytest.raises(ValueError, match="lies in one encoder"):
        parse_text_layers(["text_encoder.1", "text_encoder_2.1"])


@pytest.mark.slow
def test_layer_injection_on_random_sd(random_sd):
    """SD 1.5 and 2.1 (random weights, 64-pixel images, 2 steps): the UNet reads the final layer
    norm of the last CLIP layer, so the last layer replaced is the source image; none, the target."""
    model = wrap(random_sd.pipeline, GenerationDefaults(2, 5.0, height=64, width=64))
    target, source = _images(model, TARGETS[:1], steps=2), _images(model, SOURCES[:1], steps=2)
    last = len(encoder_layers(random_sd.pipeline)) - 1
    assert last == {"1.5": 11, "2.1": 22}[random_sd.version]
    assert torch.equal(_images(model, TARGETS[:1], TextLayerInjection(SOURCES[:1], [last]), steps=2), source)
    assert torch.equal(_images(model, TARGETS[:1], TextLayerInjection(SOURCES[:1], ()), steps=2), target)
    some = _images(model, TARGETS[:1], TextLayerInjection(SOURCES[:1], [0], tokens=[SUBJECT]), steps=2)
    assert not torch.equal(some, target) and not torch.equal(some, source)
    assert _text_hooks(random_sd.pipeline) == 0


@pytest.mark.slow
def test_the_second_sdxl_encoder():
    """SDXL-tiny: `text_encoder_2` at every token is the source's half of the text states and its
    pooled embedding (equal token counts: the pooled token is at the same place), the first
    encoder's half stays the target's."""
    pipe = build_random_sd("xl-tiny", seed=0, sample_size=8)
    model = wrap(pipe, GenerationDefaults(2, 5.0))
    injected = generate(model, TARGETS, seeds=0, progress=False, inject=TextLayerInjection(SOURCES, [0], "text_encoder_2"))
    encode = lambda p: pipe.encode_prompt(p, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)  # noqa: E731
    (target, _, _, _), (source, _, pooled, _) = encode(TARGETS), encode(SOURCES)
    width = pipe.text_encoder.config.hidden_size
    states = torch.cat([target[..., :width], source[..., width:]], dim=-1)
    expected = pipe(prompt_embeds=states, pooled_prompt_embeds=pooled, num_inference_steps=2, guidance_scale=5.0,
                    output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(2)]).images.float().cpu()  # fmt: skip
    assert torch.equal(injected, expected)
    assert not torch.equal(injected, generate(model, SOURCES, seeds=0, progress=False))  # the first encoder still matters
    assert len(encoder_layers(pipe, "text_encoder_2")) == pipe.text_encoder_2.config.num_hidden_layers
    assert text_layers(pipe)[-1] == f"text_encoder_2.{pipe.text_encoder_2.config.num_hidden_layers - 1}"
