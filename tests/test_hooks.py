"""The one hook protocol: hooks removed on exit and on an exception, held for an object's lifetime
until `close`, named in errors, found by path, ordered by `prepend`; the step counter; and no
module of the package but `hooks.py` registering torch hooks itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import acterase_interp
from acterase_interp.hooks import Hooks, StepSchedule, count_steps


class Toy(nn.Module):
    """A denoiser-shaped toy: `toy(x, timestep)`, with a submodule at `inner.lin`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential()
        self.inner.add_module("lin", nn.Identity())

    def forward(self, x: torch.Tensor, timestep: float | None = None, *, scale: float = 1.0) -> torch.Tensor:
        return self.inner(x) * scale


class ToyDiT(Toy):
    """Looks like a diffusion transformer to `is_dit` (double blocks, no down blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList()


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_hooks_act_inside_the_block_and_are_removed_on_exit():
    toy, x = Toy(), torch.ones(2)
    with Hooks() as hooks:
        hooks.forward(toy, lambda m, args, out: out + 1, name="add one")
        hooks.pre(toy, lambda m, args, kwargs: (args, {**kwargs, "scale": 3.0}), name="triple", with_kwargs=True)
        hooks.forward(toy, lambda m, args, out: out * 10, name="inner", path="inner.lin")
        assert len(toy._forward_hooks) == 1 and len(toy._forward_pre_hooks) == 1
        assert len(toy.inner.lin._forward_hooks) == 1
        assert torch.equal(toy(x), torch.full((2,), 31.0))  # (x * 10) * 3 + 1
        assert hooks.names == ["add one", "triple", "inner"]
    assert _hook_count(toy) == 0 and hooks.names == []
    assert torch.equal(toy(x), x)


def test_hooks_are_removed_on_an_exception():
    toy = Toy()
    with pytest.raises(KeyError, match="boom"):
        with Hooks() as hooks:
            hooks.forward(toy, lambda m, args, out: out, name="a", path="inner.lin")
            hooks.pre(toy, lambda m, args: None, name="b")
            raise KeyError("boom")
    assert _hook_count(toy) == 0


def test_an_error_inside_a_hook_names_it_and_still_removes_everything():
    toy = Toy()

    def fail(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed") as raised:
        with Hooks() as hooks:
            hooks.forward(toy, fail, name="failing probe", path="inner.lin")
            toy(torch.ones(1))
    assert raised.value.__notes__ == ["raised in hook 'failing probe'"]
    assert _hook_count(toy) == 0


def test_a_missing_path_is_a_clear_error():
    with pytest.raises(ValueError, match=r"hook 'probe': a Toy has no submodule 'inner.nope'"):
        with Hooks() as hooks:
            hooks.forward(Toy(), lambda m, a, o: o, name="probe", path="inner.nope")


def test_prepend_runs_a_hook_before_those_already_registered():
    toy, order = Toy(), []
    with Hooks() as hooks:
        hooks.forward(toy, lambda m, a, o: order.append("first"), name="first")
        hooks.forward(toy, lambda m, a, o: order.append("prepended"), name="prepended", prepend=True)
        toy(torch.ones(1))
    assert order == ["prepended", "first"]


def test_hooks_held_for_an_objects_lifetime_until_close():
    toy, x = Toy(), torch.ones(1)
    hooks = Hooks()
    handle = hooks.forward(toy, lambda m, a, o: o + 1, name="kept")
    early = hooks.forward(toy, lambda m, a, o: o * 5, name="removed early")
    early.remove()  # a handle removes its one hook
    assert torch.equal(toy(x), x + 1) and repr(hooks) == "Hooks(['kept', 'removed early'])"
    hooks.close()
    assert _hook_count(toy) == 0 and torch.equal(toy(x), x)
    handle.remove()
    hooks.close()  # removing twice is harmless


def test_step_counter_counts_runs_and_is_removed_on_exit():
    toy, x = Toy(), torch.ones(1)
    with Hooks() as hooks:
        seen = []
        # registered first, but the counter's pre-hook is prepended: it reads the new step
        hooks.pre(toy, lambda m, args: seen.append(counter.step), name="reader")
        counter = hooks.count_steps(toy)
        for t in (900, 600, 600, 300, 900, 500):  # a repeated step (PNDM), then a new run
            toy(x, t)
        assert seen == [0, 1, 2, 3, 0, 1] and counter.timestep == 500.0
        assert counter.within((1, 2)) and not counter.within((2, 4))
        assert hooks.names == ["reader", "step counter"]
    assert _hook_count(toy) == 0


def test_step_counter_follows_a_schedule_and_a_dits_repeats():
    toy, x = Toy(), torch.ones(1)
    with count_steps(toy, StepSchedule(2, (900.0, 400.0))) as counter:
        toy(x, 900)
        toy(x, timestep=torch.tensor([400, 400]))
        toy(x, 900)  # past the schedule's last step: a new run, even at a falling timestep
        assert counter.step == 0
        with pytest.raises(RuntimeError, match="fitted for timestep 400.0") as raised:
            toy(x, 300)
        assert raised.value.__notes__ == ["raised in hook 'step counter'"]
    dit = ToyDiT()
    with count_steps(dit) as counter:
        for t in (1.0, 1.0, 0.5, 0.5):  # FLUX's true CFG: two calls per sigma
            dit(x, t)
        assert counter.step == 1
    assert _hook_count(toy) == 0 and _hook_count(dit) == 0


def test_only_the_hooks_module_registers_torch_hooks():
    package = Path(acterase_interp.__file__).parent
    calls = ("register_forward_hook", "register_forward_pre_hook")
    sources = {path.relative_to(package).as_posix(): path.read_text() for path in package.rglob("*.py")}
    assert all(call in sources["hooks.py"] for call in calls)
    offenders = [name for name, text in sources.items() if name != "hooks.py" and any(c in text for c in calls)]
    assert offenders == []
