"""Param groups are plain dicts; the Adam family's groups keep torch's "betas" beside beta1/beta2.

The optimizer makes ``group["betas"]`` and ``(group["beta1"], group["beta2"])`` agree before each
step, the side that changed since the last step winning (see :class:`torchupdates.Optimizer`).
References: an optimizer built with the values directly, which must agree bit for bit.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim import lr_scheduler

import torchupdates as updates

ADAM_FAMILY = ["adam", "adamax", "amsgrad"]


def params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_() for s in ((3, 2), (4,))]


def grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in ((3, 2), (4,))]


def run(opt: torch.optim.Optimizer, steps: range) -> None:
    for k in steps:
        opt.step(grads(k))


def assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", [*ADAM_FAMILY, "sgd", "rmsprop", "momentum"])
def test_groups_and_defaults_are_plain_dicts(name: str) -> None:
    opt = getattr(updates, name)([{"params": params()[:1]}, {"params": params()[1:], "lr": 0.5}], 0.01)
    assert type(opt.defaults) is dict
    for group in opt.param_groups:
        assert type(group) is dict
        assert ("betas" in group) == (name in ADAM_FAMILY) == ("betas" in opt.defaults)


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_betas_is_a_real_key_every_dict_method_agrees(name: str) -> None:
    opt = getattr(updates, name)(params(), beta1=0.8, beta2=0.99)
    group = opt.param_groups[0]
    assert "betas" in group and "betas" in list(group)
    assert group["betas"] == group.get("betas") == dict(group)["betas"] == {**group}["betas"] == (0.8, 0.99)
    assert opt.defaults["betas"] == (0.8, 0.99)
    assert ("betas", (0.8, 0.99)) in group.items()
    assert repr(group)  # a dict's repr
    opt.step(grads(0))
    assert group["betas"] == (group["beta1"], group["beta2"]) == (0.8, 0.99)


@pytest.mark.parametrize("name", ADAM_FAMILY)
@pytest.mark.parametrize(
    "how",
    [
        lambda g: g.update(betas=(0.5, 0.9)),
        lambda g: g.__setitem__("betas", (0.5, 0.9)),
        lambda g: g.__setitem__("betas", [0.5, 0.9]),
        lambda g: g.update(beta1=0.5, beta2=0.9),
        lambda g: g.update(beta1=0.5, beta2=0.9, betas=(0.5, 0.9)),
    ],
    ids=["update(betas)", "[betas]=", "[betas]=list", "update(beta1, beta2)", "both, agreeing"],
)
def test_either_side_set_between_steps_drives_the_next_step(name: str, how) -> None:
    ours, reference = params(), params()
    opt = getattr(updates, name)(ours, 0.01)
    ref_opt = getattr(updates, name)(reference, 0.01)
    run(opt, range(2))
    run(ref_opt, range(2))
    how(opt.param_groups[0])
    ref_opt.param_groups[0].update(beta1=0.5, beta2=0.9, betas=(0.5, 0.9))
    run(opt, range(2, 4))
    run(ref_opt, range(2, 4))
    assert_equal(ours, reference)
    group = opt.param_groups[0]
    assert group["beta1"] == 0.5 and group["beta2"] == 0.9 and group["betas"] == (0.5, 0.9)
    assert type(group["betas"]) is tuple


def test_both_sides_changed_to_different_values_raise_and_write_nothing() -> None:
    ours = params()
    opt = updates.adam(ours, 0.01)
    run(opt, range(1))
    before = [p.detach().clone() for p in ours]
    opt.param_groups[0]["beta1"] = 0.5
    opt.param_groups[0]["betas"] = (0.7, 0.999)
    with pytest.raises(ValueError, match=r"param group 0: betas=\(0.7, 0.999\).*both changed"):
        opt.step(grads(1))
    assert_equal(ours, before)
    assert int(opt.state[ours[0]]["step"]) == 1
    opt.param_groups[0]["betas"] = (0.5, 0.999)  # agreeing now
    opt.step(grads(1))
    assert opt.param_groups[0]["betas"] == (0.5, 0.999)


@pytest.mark.parametrize("bad", [0.5, (0.5,), (0.5, 0.9, 0.99), "ab"])
def test_betas_must_be_a_pair(bad) -> None:
    opt = updates.adam(params())
    opt.param_groups[0]["betas"] = bad
    with pytest.raises(ValueError, match=r"betas must be a pair"):
        opt.step(grads(0))
    with pytest.raises(ValueError, match=r"betas must be a pair"):
        updates.adam([{"params": params(), "betas": bad}])


def test_betas_out_of_range_is_checked_like_beta1() -> None:
    opt = updates.adam(params())
    opt.param_groups[0]["betas"] = (1.0, 0.999)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        opt.step(grads(0))


def test_param_groups_may_give_betas() -> None:
    a, b = params(), params()
    opt = updates.amsgrad([{"params": a[:1], "betas": (0.5, 0.9)}, {"params": a[1:], "beta2": 0.9}], 0.01)
    assert opt.param_groups[0]["beta1"] == 0.5 and opt.param_groups[0]["beta2"] == 0.9
    assert opt.param_groups[1]["betas"] == (0.9, 0.9)
    ref_opt = updates.amsgrad([{"params": b[:1], "beta1": 0.5, "beta2": 0.9}, {"params": b[1:], "beta2": 0.9}], 0.01)
    run(opt, range(3))
    run(ref_opt, range(3))
    assert_equal(a, b)
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0.6, 0.95), "beta1": 0.6})
    assert opt.param_groups[2]["beta2"] == 0.95
    with pytest.raises(ValueError, match=r"gives betas=\(0.6, 0.95\) and beta1=0.7"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0.6, 0.95), "beta1": 0.7})
    assert len(opt.param_groups) == 3


def test_a_group_appended_by_hand_or_a_removed_betas_key() -> None:
    opt = updates.adam(params()[:1])
    opt.param_groups[0].pop("betas")
    opt.param_groups.append({**opt.defaults, "params": params(1)[1:], "beta1": 0.5})  # betas left at 0.9
    with pytest.raises(ValueError, match=r"param group 1.*disagree"):
        opt.step([grads(0)[0], grads(0)[1]])
    opt.param_groups[1]["betas"] = (0.5, 0.999)
    opt.step([grads(0)[0], grads(0)[1]])
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_state_dict_copies_and_compose_see_the_betas_a_scheduler_set() -> None:
    """A scheduler writes "betas" and a checkpoint, a copy or a composition follows before the
    next step: each continues as the original does."""
    ours = params()
    opt = updates.adam(ours, 0.01)
    run(opt, range(2))
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["beta1"] == 0.5 and saved["param_groups"][0]["betas"] == (0.5, 0.9)
    copies = [copy.deepcopy((opt, ours)), pickle.loads(pickle.dumps((opt, ours)))]
    resumed = [p.detach().clone().requires_grad_() for p in ours]
    loaded = updates.adam(resumed, 0.01)
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["betas"] == (0.5, 0.9)
    run(opt, range(2, 4))
    run(loaded, range(2, 4))
    assert_equal(resumed, ours)
    for opt_copy, copy_params in copies:
        run(opt_copy, range(2, 4))
        assert_equal(copy_params, ours)

    composed_params = params()
    base = updates.adam(composed_params, 0.01)
    run(base, range(2))
    base.param_groups[0]["betas"] = (0.5, 0.9)
    composed = updates.apply_momentum(base, momentum=0.5)
    assert composed.param_groups[0]["beta1"] == 0.5 and composed.defaults["betas"] == (0.9, 0.999)


def test_tensor_betas_keep_their_identity() -> None:
    beta1 = torch.tensor(0.9, dtype=torch.float64)
    opt = updates.adam(params(), beta1=beta1)
    group = opt.param_groups[0]
    assert group["betas"][0] is beta1
    run(opt, range(2))
    beta1.fill_(0.5)  # in place: both sides hold the same tensor
    run(opt, range(2, 3))
    assert group["beta1"] is beta1 and group["betas"][0] is beta1


def test_cyclic_lr_cycles_beta1_through_betas() -> None:
    ours, reference = params(), params()
    opt = updates.adam(ours, 0.01)
    scheduler = lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=2, cycle_momentum=True)
    ref_opt = updates.adam(reference, 0.01)
    seen = set()
    for k in range(5):
        lr, beta1 = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]
        seen.add(beta1)
        ref_opt.param_groups[0].update(lr=lr, beta1=beta1, betas=(beta1, 0.999))
        opt.step(grads(k))
        ref_opt.step(grads(k))
        assert opt.param_groups[0]["beta1"] == beta1
        scheduler.step()
    assert_equal(ours, reference)
    assert len(seen) > 1  # it did cycle
