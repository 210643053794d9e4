"""Intervention sites: named places in the UNet and the text encoders where activations are
recorded and patched.

Each UNet transformer block offers seven sites, named `<block>.<kind>`, in execution order:

- `attn1_out`: the output of self-attention `attn1`;
- `attn2_k`, `attn2_v`: the outputs of cross-attention's key and value projections `attn2.to_k` /
  `attn2.to_v`, one row per *text* token (they depend on the prompt only, not on the latent or step);
- `attn2_out`: the output of cross-attention `attn2`;
- `ffn_hidden`: the GEGLU output, i.e. the input of `ff.net.2` (the paper's default site);
- `ffn_out`: the output of the feed-forward module `ff`;
- `block_out`: the output of the transformer block (`BasicTransformerBlock`) itself;

and `unet_out` is the UNet's output. Blocks are named `down.<i>.<j>`, `mid.<j>` and `up.<i>.<j>`
(`<i>` the UNet block, `<j>` its attention module), with a `.t<k>` suffix for the k-th transformer
layer where an attention module holds several (SDXL: `down.2.1.t3`; SD 1.x/2.x hold one each, so
their names have none). A block name or prefix (`down`, `up.0`, `mid.0`, `down.2.1`) selects blocks.
Sites are listed in execution order, which nnsight requires within a denoising step, with shapes
measured by one forward pass.

The text encoders offer one more kind, `text_layer`: the output of one transformer layer, named
`text_encoder.<i>` (SDXL's second encoder: `text_encoder_2.<i>`) as in `text_layers`, one row per
text token. Its `Site.component` is the encoder (every other site's is `unet`), its block is its own
name, so `blocks=("text_encoder",)` selects every layer of the encoder and `("text_encoder.5",)`
one. `text_layers.text_layer_sites` lists them; the encoders run before the denoising loop.

Only `ffn_hidden` is read by a Linear (`ff.net.2`), whose weight weighs Eq. 4's importance; the
other kinds are read by attention, a LayerNorm or a residual sum, so their importance is |x|.

Diffusion transformers (FLUX, SD3: MM-DiTs, `Site.component` "transformer") have no cross-attention:
image and text tokens attend jointly. Their sites (`DIT_KINDS`) are named `<block>.<kind>` with blocks
`double.<i>` (`transformer_blocks.<i>`: FLUX's double-stream blocks, SD3's joint blocks) and
`single.<i>` (FLUX's `single_transformer_blocks.<i>`):

- `txt_k`, `txt_v` (double): the text stream's key and value projections `attn.add_k_proj` /
  `attn.add_v_proj`, one row per text token: the analogue of `attn2_k` / `attn2_v`;
- `img_mlp_hidden` / `txt_mlp_hidden` (double): the input of `ff.net.2` / `ff_context.net.2`, the
  hidden units of each stream's MLP (read by those Linears; ActErase's FFN site);
- `mlp_hidden` (single): the output of `act_mlp`, one row per token of the joint sequence (text
  first, then image); `proj_out` reads [attention output, MLP hidden], so its columns from
  `Site.reader_offset` on weigh the importance;
- `txt_out`, `img_out`: the block's outputs, items 0 and 1 of the (text, image) pair it returns
  (`Site.output_index`).

SD3's last joint block keeps no text stream (`context_pre_only`): it has no `txt_mlp_hidden` and no
`txt_out`. `double.last<N>` / `single.last<N>` select the last N blocks of a kind (`select_sites`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import re

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .hooks import Hooks, is_dit  # noqa: F401  (is_dit: re-exported; the step counter needs it too)

DIT_KINDS: tuple[str, ...] = ("txt_k", "txt_v", "img_mlp_hidden", "txt_mlp_hidden", "mlp_hidden", "txt_out", "img_out")
SITE_KINDS: tuple[str, ...] = (
    "text_layer", "attn1_out", "attn2_k", "attn2_v", "attn2_out", "ffn_hidden", "ffn_out", "block_out", "unet_out",
    *DIT_KINDS,
)  # fmt: skip
UNET_OUT = "unet_out"
TEXT_LAYER = "text_layer"
"""The kind of a text-encoder layer's output, the one kind outside the UNet."""
UNET = "unet"
"""The `Site.component` of every UNet site."""
TRANSFORMER = "transformer"
"""The `Site.component` of every DiT site."""
DENOISERS: tuple[str, ...] = (UNET, TRANSFORMER)
"""Components that denoise (called once per step); the others are text encoders."""
TEXT_TOKEN_KINDS: tuple[str, ...] = ("attn2_k", "attn2_v", "txt_k", "txt_v", "txt_mlp_hidden", "txt_out")
"""Kinds whose tokens are the prompt's text tokens rather than latent pixels."""
TEXT_TOKENS = 77
"""Text tokens of SD's CLIP context: the default length of the probe prompt in `discover_sites`."""

# kind -> (module path inside a transformer block, "input" or "output", path of the Linear that reads it)
_KIND_SPEC: dict[str, tuple[str, str, str | None]] = {
    "attn1_out": ("attn1", "output", None),
    "attn2_k": ("attn2.to_k", "output", None),  # read by q·k attention scores, not by a Linear
    "attn2_v": ("attn2.to_v", "output", None),  # mixed by attention weights before `to_out` reads it
    "attn2_out": ("attn2", "output", None),
    "ffn_hidden": ("ff.net.2", "input", "ff.net.2"),
    "ffn_out": ("ff", "output", None),
    "block_out": ("", "output", None),  # the block itself; the next block's LayerNorm reads it
}

PRESETS: dict[str, tuple[str, ...]] = {"locogen": ("up.1.1", "up.1.2")}
"""Named block sets, usable wherever `blocks` are asked for (`blocks=("locogen",)`). `locogen`:
LocoGen's (Basu et al. 2024) default cross-attention layers 8-9 of SD 1.x / 2.x, counted over the
16 transformer blocks in execution order, i.e. `up_blocks.1.attentions.1` and `.2`. On SDXL the
same names are prefixes of `up.1.1.t0-t1` and `up.1.2.t0-t1`, which LocoGen did not study there."""


@dataclass(frozen=True)
class Site:
    """One intervention site of a UNet or of a pipeline's text encoder."""

    name: str
    """Human name, e.g. `down.1.0.ffn_hidden` or `unet_out`."""
    kind: str
    """One of `SITE_KINDS`."""
    block: str
    """The transformer block (`down.1.0`, `mid.0`, `up.1.2`), `unet` for `unet_out`, or the site's
    own name for a `text_layer` (`text_encoder.5`)."""
    module_path: str
    """Dotted path of the module inside its `component` ("" for the UNet itself)."""
    io: str
    """Whether the site is the module's `input` or its `output`."""
    reader_path: str | None
    """Dotted path of the Linear whose weight reads the site (importance I = W·|x|), or None."""
    shape: tuple[int, ...]
    """Shape of the activation for one image: (tokens, channels), or (C, H, W) for `unet_out`;
    tokens are latent pixels, or text tokens for `TEXT_TOKEN_KINDS` and `text_layer`."""
    component: str = UNET
    """The pipeline attribute holding the module: `unet`, `transformer`, or `text_encoder` / `text_encoder_2`."""
    output_index: int = 0
    """Which item of a module's tuple output the site is (a DiT block returns (text, image))."""
    reader_offset: int = 0
    """The reader's first input column that reads the site: it reads a concatenation otherwise."""


def _block_names(unet: UNet2DConditionModel) -> list[tuple[str, str]]:
    """(human block name, module path) of every transformer block, in module order."""
    out = []
    groups = [("down", f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    groups.append(("mid", "mid_block", unet.mid_block))
    groups += [("up", f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, path, block in groups:
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            blocks = attn.transformer_blocks
            for k in range(len(blocks)):
                index = f"{j}" if prefix == "mid" else f"{path.split('.')[1]}.{j}"
                name = f"{prefix}.{index}" + (f".t{k}" if len(blocks) > 1 else "")
                out.append((name, f"{path}.attentions.{j}.transformer_blocks.{k}"))
    return out


def list_sites(unet: UNet2DConditionModel) -> list[Site]:
    """Every site of `unet` in module order, without shapes: names and paths only, no forward pass."""
    sites = []
    for block, path in _block_names(unet):
        for kind, (sub, io, reader) in _KIND_SPEC.items():
            module = f"{path}.{sub}" if sub else path
            sites.append(Site(f"{block}.{kind}", kind, block, module, io, reader and f"{path}.{reader}", ()))
    sites.append(Site(UNET_OUT, UNET_OUT, "unet", "", "output", None, ()))
    return sites


def _added_conditions(unet: UNet2DConditionModel, like: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The extra inputs of an SDXL-style UNet (`addition_embed_type="text_time"`): pooled text
    embeddings and time ids, which it embeds together. No site's shape depends on them, so zeros
    of the embedding's total width do (one time id, the rest pooled text)."""
    if unet.config.get("addition_embed_type") != "text_time":
        return None
    width = unet.add_embedding.linear_1.in_features - unet.config.addition_time_embed_dim
    new = dict(dtype=like.dtype, device=like.device)
    return {"text_embeds": torch.zeros(1, width, **new), "time_ids": torch.zeros(1, 1, **new)}


@torch.no_grad()
def discover_sites(
    unet: UNet2DConditionModel, sample_size: int | None = None, text_tokens: int = TEXT_TOKENS
) -> list[Site]:
    """Every site of `unet`, in execution order, with per-image shapes at `sample_size` latent
    pixels (default: the UNet's configured sample size) and, for `TEXT_TOKEN_KINDS`, prompts of
    `text_tokens` tokens (the tokenizer's `model_max_length`). Runs one forward pass on zeros."""
    size = sample_size or unet.config.sample_size
    candidates = {(s.module_path, s.io): s for s in list_sites(unet)}
    seen: list[tuple[Site, tuple[int, ...]]] = []
    with Hooks() as hooks:
        for (path, io), site in candidates.items():

            def hook(mod, args, output, site=site):
                x = args[0] if site.io == "input" else output
                x = x.sample if hasattr(x, "sample") else (x[0] if isinstance(x, tuple) else x)
                seen.append((site, tuple(x.shape[1:])))

            hooks.forward(unet, hook, name=f"shape of {site.name}", path=path)
        p = next(unet.parameters())
        sample = torch.zeros(1, unet.config.in_channels, size, size, dtype=p.dtype, device=p.device)
        context = torch.zeros(1, text_tokens, unet.config.cross_attention_dim, dtype=p.dtype, device=p.device)
        unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=_added_conditions(unet, p))
    # Forward hooks fire when a module returns: a Linear's input hook fires before its parent's output,
    # to_k's and to_v's outputs before attn2's, and a block's output after all of its parts.
    return [Site(s.name, s.kind, s.block, s.module_path, s.io, s.reader_path, shape) for s, shape in seen]


def select_sites(
    sites: list[Site], kinds: str | tuple[str, ...] | list[str] = "ffn_hidden", blocks: list[str] | None = None
) -> list[Site]:
    """The sites of the given kinds (and, if given, blocks, block prefixes such as "down", or
    `PRESETS` names), in execution order. Unknown kinds or blocks are an error."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    blocks = None if blocks is None else [b for name in blocks for b in _expand(name, sites)]
    bad = [k for k in kinds if k not in SITE_KINDS]
    if bad:
        raise ValueError(f"unknown site kind(s) {bad}; choose from {SITE_KINDS}")
    known_blocks = list(dict.fromkeys(s.block for s in sites if s.kind not in (UNET_OUT, TEXT_LAYER)))
    known_layers = list(dict.fromkeys(s.block for s in sites if s.kind == TEXT_LAYER))

    def wanted(block: str) -> bool:
        return blocks is None or any(block == b or block.startswith(b + ".") for b in blocks)

    if blocks is not None:
        missing = [b for b in blocks if not any(k == b or k.startswith(b + ".") for k in known_blocks + known_layers)]
        if missing:
            text = f"; text-encoder layers {_fold_text(known_layers)}" if known_layers else ""
            raise ValueError(
                f"unknown block(s) {missing}; this UNet has {_fold_layers(known_blocks)} (or prefixes down/mid/up){text}"
            )
    return [s for s in sites if s.kind in kinds and (s.kind == UNET_OUT or wanted(s.block))]


def _expand(name: str, sites: list[Site]) -> tuple[str, ...]:
    """A `PRESETS` name's blocks; `double.last<N>` / `single.last<N>`: the last N DiT blocks of that
    kind; else the name itself."""
    if name in PRESETS:
        return PRESETS[name]
    match = re.fullmatch(r"(double|single)\.last(\d+)", name)
    if match is None:
        return (name,)
    kind, n = match.group(1), int(match.group(2))
    present = list(dict.fromkeys(s.block for s in sites if s.block.startswith(kind + ".")))
    if not 0 < n <= len(present):
        raise ValueError(f"{name!r} asks for the last {n} {kind} blocks; this model has {len(present)}")
    return tuple(present[-n:])


def _fold_layers(blocks: list[str]) -> str:
    """Block names for a message, the layers of one attention module folded: `down.2.1.t0-t9`."""
    folded: dict[str, list[str]] = {}
    for block in blocks:
        head, _, last = block.rpartition(".")
        if last.startswith("t") and last[1:].isdigit():
            folded.setdefault(head, []).append(last)
        else:
            folded[block] = []
    return ", ".join(f"{k}.{v[0]}-{v[-1]}" if v else k for k, v in folded.items())  # suffixed layers come 2+


def _fold_text(layers: list[str]) -> str:
    """Text-encoder layers for a message, folded per encoder: `text_encoder.0-11`."""
    per: dict[str, list[str]] = {}
    for layer in layers:
        encoder, _, i = layer.rpartition(".")
        per.setdefault(encoder, []).append(i)
    return ", ".join(f"{e}.{v[0]}-{v[-1]}" if len(v) > 1 else f"{e}.{v[0]}" for e, v in per.items())


def site_by_name(sites: list[Site], name: str) -> Site:
    """The site called `name`; a clear error lists the names that exist."""
    for s in sites:
        if s.name == name:
            return s
    raise KeyError(f"unknown site {name!r}; this UNet has: {', '.join(s.name for s in sites)}")


def reader_weight_norm(unet: nn.Module, site: Site) -> torch.Tensor | None:
    """Per-unit L1 norm of the reading Linear's weight columns, sum_i |W_ij|, so that the
    per-unit importance of Eq. 4 is I_j = |x_j| * sum_i |W_ij|; None where no Linear reads the site.
    `unet` is the denoiser (a UNet or a DiT); only the columns from `site.reader_offset` on read it."""
    if site.reader_path is None:
        return None
    weight = unet.get_submodule(site.reader_path).weight
    # One fused reduction: `.abs().sum(0)` would allocate a weight-sized temporary, and on glibc
    # freeing it raises malloc's mmap threshold, which grew the SD 1.5 fit's peak 2x (benchmarks).
    return torch.linalg.vector_norm(weight.detach()[:, site.reader_offset :], ord=1, dim=0).float()


# -- diffusion transformers (FLUX, SD3) --------------------------------------------------------

# kind -> (module path inside a block, "input" or "output", reader path, output index)
_DOUBLE_SPEC: dict[str, tuple[str, str, str | None, int]] = {
    "txt_k": ("attn.add_k_proj", "output", None, 0),  # read by q·k scores of the joint attention
    "txt_v": ("attn.add_v_proj", "output", None, 0),
    "img_mlp_hidden": ("ff.net.2", "input", "ff.net.2", 0),
    "txt_mlp_hidden": ("ff_context.net.2", "input", "ff_context.net.2", 0),
    "txt_out": ("", "output", None, 0),
    "img_out": ("", "output", None, 1),
}
_SINGLE_SPEC: dict[str, tuple[str, str, str | None, int]] = {
    "mlp_hidden": ("act_mlp", "output", "proj_out", 0),
    "txt_out": ("", "output", None, 0),
    "img_out": ("", "output", None, 1),
}


DIT_ANALOGUES: dict[str, tuple[str, ...]] = {"ffn_hidden": ("img_mlp_hidden", "mlp_hidden")}
"""UNet kinds -> their DiT analogues: the paper's FFN site is the MLP hidden units of the image stream
(double blocks) and of the joint stream (single blocks), so a default fit runs on a DiT unchanged."""


def dit_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`kinds` with each UNet kind that has a DiT analogue (`DIT_ANALOGUES`) replaced by it."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    return tuple(dict.fromkeys(k2 for k in kinds for k2 in DIT_ANALOGUES.get(k, (k,))))


def _keeps_text(block: nn.Module) -> bool:
    """Whether a double block updates the text stream (SD3's last block does not)."""
    return getattr(block, "ff_context", None) is not None


def list_dit_sites(transformer: nn.Module) -> list[Site]:
    """Every site of a DiT in module order, without shapes (no forward pass)."""
    sites = []
    groups = [("double", "transformer_blocks", _DOUBLE_SPEC), ("single", "single_transformer_blocks", _SINGLE_SPEC)]
    for prefix, attr, spec in groups:
        for i, block in enumerate(getattr(transformer, attr, None) or []):
            for kind, (sub, io, reader, index) in spec.items():
                if kind.startswith("txt_") and kind not in ("txt_k", "txt_v") and prefix == "double" and not _keeps_text(block):
                    continue
                path = f"{attr}.{i}"
                offset = block.proj_out.in_features - block.proj_mlp.out_features if kind == "mlp_hidden" else 0
                sites.append(Site(f"{prefix}.{i}.{kind}", kind, f"{prefix}.{i}", f"{path}.{sub}" if sub else path, io,
                                  reader and f"{path}.{reader}", (), TRANSFORMER, index, offset))  # fmt: skip
    return sites


def _dit_probe(transformer: nn.Module, side: int, text_tokens: int) -> dict[str, torch.Tensor]:
    """Zero inputs of one DiT call on a `side` x `side` latent with `text_tokens` text tokens."""
    config, p = transformer.config, next(transformer.parameters())
    new = dict(dtype=p.dtype, device=p.device)
    inputs = {
        "encoder_hidden_states": torch.zeros(1, text_tokens, config.joint_attention_dim, **new),
        "pooled_projections": torch.zeros(1, config.pooled_projection_dim, **new),
        "timestep": torch.ones(1, **new),
        "return_dict": False,
    }
    if "axes_dims_rope" not in config:  # SD3: latents as images, patched inside
        return {"hidden_states": torch.zeros(1, config.in_channels, side, side, **new), **inputs}
    tokens = (side // 2) ** 2  # FLUX: the pipeline packs 2x2 latent patches into tokens
    ids = dict(dtype=p.dtype, device=p.device)
    guidance = {"guidance": torch.ones(1, **new)} if config.guidance_embeds else {}
    return {"hidden_states": torch.zeros(1, tokens, config.in_channels, **new), "img_ids": torch.zeros(tokens, 3, **ids),
            "txt_ids": torch.zeros(text_tokens, 3, **ids), **guidance, **inputs}  # fmt: skip


@torch.no_grad()
def discover_dit_sites(transformer: nn.Module, sample_size: int = 4, text_tokens: int = 8) -> list[Site]:
    """Every site of a DiT in execution order, with per-image shapes at `sample_size` latent pixels
    and `text_tokens` text tokens (measured by one forward pass on zeros: order by hooks)."""
    by_module: dict[tuple[str, str], list[Site]] = {}
    for site in list_dit_sites(transformer):
        by_module.setdefault((site.module_path, site.io), []).append(site)
    seen: list[Site] = []
    with Hooks() as hooks:
        for (path, io), group in by_module.items():

            def hook(mod, args, output, group=group):
                for s in group:
                    x = args[0] if s.io == "input" else output
                    x = x[s.output_index] if isinstance(x, tuple) else x
                    seen.append(replace(s, shape=tuple(x.shape[1:])))

            hooks.forward(transformer, hook, name=f"shapes of {', '.join(s.name for s in group)}", path=path)
        transformer(**_dit_probe(transformer, sample_size, text_tokens))
    return seen
