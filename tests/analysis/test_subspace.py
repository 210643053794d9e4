"""The subspace patch on a toy UNet: Eq. 6 for a unit basis, a projection for directions, and
switched on only in its window of denoising steps."""

import pytest
import torch
from torch import nn

from acterase_interp.patching import count_steps, patched
from acterase_interp.analysis.subspace import SubspacePatch, top_directions, top_units
from acterase_interp.sites import Site

TOKENS, UNITS = 4, 6
SITE = Site("b.ffn_hidden", "ffn_hidden", "b", "lin", "input", "lin", (TOKENS, UNITS))


class ToyUNet(nn.Module):
    """Called like a UNet, (sample, timestep); its site is the input of `lin`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Identity()

    def forward(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        return self.lin(x)


def _differences() -> torch.Tensor:
    d = torch.zeros(5, UNITS)
    d[:, 2] = torch.tensor([3.0, 2.0, 4.0, 3.0, 5.0])  # unit 2 carries most difference energy
    d[:, 4] = 1.0
    return d


def test_unit_basis_is_eq6_on_the_top_units():
    diffs = _differences()
    assert torch.equal(top_units(diffs, 2).argmax(0), torch.tensor([2, 4]))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(TOKENS, UNITS, generator=g)
    patch = SubspacePatch.from_differences([SITE], {SITE.name: diffs}, {SITE.name: mean}, k=2, kind="units")
    x = torch.randn(3, TOKENS, UNITS, generator=g)
    mask = torch.zeros(UNITS, dtype=torch.bool)
    mask[[2, 4]] = True
    # the patch is x + (m - x) V V^T in float32, so equal to Eq. 6 only up to rounding
    assert torch.allclose(patch(SITE.name, x), torch.where(mask, mean, x), atol=1e-6)


def test_direction_basis_replaces_only_the_component_in_the_span():
    g = torch.Generator().manual_seed(0)
    diffs = torch.randn(8, 2, generator=g) @ torch.randn(2, UNITS, generator=g)  # rank 2
    basis = top_directions(diffs, 2)
    assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
    mean = torch.randn(UNITS, generator=g)
    patch = SubspacePatch.from_differences([SITE], {SITE.name: diffs}, {SITE.name: mean}, k=2)
    x = torch.randn(3, TOKENS, UNITS, generator=g)
    y = patch(SITE.name, x)
    assert torch.allclose(y @ basis, (mean @ basis).expand(3, TOKENS, 2), atol=1e-5)  # in the span: the mean's
    rest = torch.eye(UNITS) - basis @ basis.T
    assert torch.allclose(y @ rest, x @ rest, atol=1e-5)  # outside it: untouched
    with pytest.raises(ValueError, match="directions"):
        top_directions(diffs[:1], 2)


def test_patch_applies_only_in_its_window_and_is_removed_on_exit():
    unet = ToyUNet()
    mean = torch.full((UNITS,), 7.0)
    patch = SubspacePatch.from_differences([SITE], {SITE.name: _differences()}, {SITE.name: mean}, k=1, kind="units")
    x = torch.zeros(1, TOKENS, UNITS)
    timesteps = (900, 700, 500, 300)
    with patch.applied(unet, steps=(1, 3)):
        for _ in range(2):  # two sampling runs: the step count restarts with the timesteps
            hit = [bool((unet(x, t)[..., 2] == 7.0).all()) for t in timesteps]
            assert hit == [False, True, True, False]
    assert torch.equal(unet(x, 700), x)
    with count_steps(unet) as counter:
        unet(x, 900)
        unet(x, 800)
        assert counter.step == 1
    with patched(unet, None) as counter:  # no patch: the model as it is
        assert torch.equal(unet(x, 900), x) and counter.step == 0


def test_bad_patches_are_rejected():
    out_site = Site("unet_out", "unet_out", "unet", "", "output", None, (4, 2, 2))
    with pytest.raises(ValueError, match="tokens, units"):
        SubspacePatch.from_differences([out_site], {"unet_out": _differences()[:, :4]}, {"unet_out": torch.zeros(4)}, k=1)
    with pytest.raises(ValueError, match="kind"):
        SubspacePatch.from_differences([SITE], {SITE.name: _differences()}, {SITE.name: torch.zeros(UNITS)}, 1, "pcs")
    with pytest.raises(ValueError, match="k must"):
        top_units(_differences(), 0)
