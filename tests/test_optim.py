"""`ptm_course.optim`'s SGD, Adam and AdamW against `torch.optim`: same trajectory to 1e-10 in float64
over 200 steps on random problems with random hyper-parameters, same constructor, same errors,
interchangeable state_dicts."""
import copy
import inspect
import math
import random

import pytest
import torch

from ptm_course import optim as ours

STEPS = 200
TOL = dict(atol=1e-10, rtol=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "These problems are tiny: on a busy 2-core machine, thread synchronisation costs more than the math."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_problem(seed: int, device="cpu", steps: int = STEPS):
    """Four float64 parameter tensors and `fill_grads(params, step)`, which sets each `.grad` (but the last's) to the
    gradient of a random non-convex loss Σ a·θ²/2 − b·cos(3θ)/3 plus fresh minibatch-like noise at every step."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 5), (5,), (3,), (2,)]
    params = [torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in shapes]
    curvature = [(0.1 + 2 * torch.rand(*s, generator=g, dtype=torch.float64)).to(device) for s in shapes]
    wiggle = [(2 * torch.rand(*s, generator=g, dtype=torch.float64) - 1).to(device) for s in shapes]
    noise = [(0.3 * torch.randn(steps, *s, generator=g, dtype=torch.float64)).to(device) for s in shapes]

    def fill_grads(ps, step, sign=1):
        "sign=-1 gives the gradient of −loss, for `maximize=True`."
        for p, a, b, n in list(zip(ps, curvature, wiggle, noise))[:-1]:   # the last tensor never gets a gradient
            p.grad = sign * (a * p.detach() + b * torch.sin(3 * p.detach()) + n[step])
    return params, fill_grads


def mlp_problem(seed: int):
    "The same, with real autograd: a small tanh network on random data, a new random minibatch at every step."
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    params = [torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.5, torch.randn(5, generator=g, dtype=torch.float64) * 0.1,
              torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.5, torch.randn(3, generator=g, dtype=torch.float64) * 0.1,
              torch.randn(2, generator=g, dtype=torch.float64)]          # never used, so never gets a gradient
    batches = torch.randint(0, 32, (STEPS, 8), generator=g)

    def loss_fn(ps, step):
        W1, b1, W2, b2, _ = ps
        idx = batches[step]
        return torch.nn.functional.cross_entropy(torch.tanh(X[idx] @ W1 + b1) @ W2 + b2, y[idx])

    def fill_grads(ps, step, sign=1):
        for p in ps: p.grad = None
        (sign * loss_fn(ps, step)).backward()
    return params, fill_grads, loss_fn


def groups(ps, second: dict):
    "Three param groups: two tensors, the next ones with their own hyper-parameters, and the last (no gradients)."
    return [{"params": ps[:2]}, {"params": ps[2:-1], **second}, {"params": ps[-1:]}]


def trajectory(make_optimizer, params, fill_grads, steps=STEPS, sign=1):
    "Every parameter vector visited, shape (steps + 1, n), from copies of `params`."
    ps = [p.detach().clone().requires_grad_() for p in params]
    opt = make_optimizer(ps)
    path = [torch.cat([p.detach().flatten() for p in ps])]
    for step in range(steps):
        fill_grads(ps, step, sign)
        opt.step()
        path.append(torch.cat([p.detach().flatten() for p in ps]))
    return torch.stack(path)


def log_uniform(r: random.Random, low, high): return 10 ** r.uniform(math.log10(low), math.log10(high))


def random_sgd_options(r: random.Random) -> dict:
    "Hyper-parameters drawn over SGD's valid ranges (lr small enough that plain SGD stays stable on these problems)."
    momentum = 0.0 if r.random() < 0.25 else r.uniform(0, 0.99)
    nesterov = momentum > 0 and r.random() < 0.4
    return dict(lr=log_uniform(r, 1e-4, 0.5), momentum=momentum,
                dampening=0.0 if nesterov or r.random() < 0.5 else r.uniform(0, 1),
                weight_decay=0.0 if r.random() < 0.4 else log_uniform(r, 1e-5, 1.0), nesterov=nesterov, maximize=r.random() < 0.2)


def random_adam_options(r: random.Random, adamw=False) -> dict:
    "Hyper-parameters drawn over Adam's valid ranges: betas in [0, 1), often close to 1 as in practice."
    opts = dict(lr=log_uniform(r, 1e-4, 1.0), betas=(0.0 if r.random() < 0.15 else 1 - log_uniform(r, 1e-3, 1.0), 1 - log_uniform(r, 1e-4, 1.0)),
                eps=log_uniform(r, 1e-12, 1e-2), weight_decay=0.0 if r.random() < 0.3 else log_uniform(r, 1e-5, 1.0),
                amsgrad=r.random() < 0.4, maximize=r.random() < 0.2)
    if not adamw: opts["decoupled_weight_decay"] = r.random() < 0.5
    return opts


RANDOM_SEEDS = range(6)


def test_random_hyperparameters_cover_every_option():
    "The random draws below exercise every option at least once (so the random tests are not vacuous)."
    sgd = [random_sgd_options(random.Random(s)) for s in RANDOM_SEEDS]
    adam = [random_adam_options(random.Random(100 + s)) for s in RANDOM_SEEDS]
    adamw = [random_adam_options(random.Random(200 + s), adamw=True) for s in RANDOM_SEEDS]
    assert any(o["nesterov"] for o in sgd) and any(o["momentum"] > 0 and o["dampening"] > 0 for o in sgd)
    assert any(o["momentum"] == 0 for o in sgd) and any(o["weight_decay"] > 0 for o in sgd)
    assert any(o["amsgrad"] for o in adam) and any(o["decoupled_weight_decay"] and o["weight_decay"] > 0 for o in adam)
    assert any(not o["decoupled_weight_decay"] and o["weight_decay"] > 0 for o in adam)
    assert any(o["amsgrad"] for o in adamw) and any(o["weight_decay"] > 0 for o in adamw)
    assert any(o["maximize"] for o in sgd + adam + adamw)


def second_group(r: random.Random, kind: str) -> dict:
    "Hyper-parameters for the second param group that differ from the defaults (always its own lr)."
    extra = {"lr": log_uniform(r, 1e-4, 0.5)}
    if kind == "sgd": extra.update(momentum=r.uniform(0.1, 0.95), weight_decay=r.choice([0.0, 0.01]))
    else: extra.update(betas=(r.uniform(0, 0.95), r.uniform(0.5, 0.999)), weight_decay=r.choice([0.0, 0.05]))
    return extra


def compare(ours_cls, torch_cls, options, second, seed, problem=random_problem, **torch_extra):
    params, fill_grads = problem(seed)[:2]
    sign = -1 if options.get("maximize") else 1          # maximize −loss: a well-posed problem either way
    mine = trajectory(lambda ps: ours_cls(groups(ps, second), **options), params, fill_grads, sign=sign)
    theirs = trajectory(lambda ps: torch_cls(groups(ps, second), **options, **torch_extra), params, fill_grads, sign=sign)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(mine, theirs, **TOL)
    return mine


# ---------------------------------------------------------------- trajectories: random hyper-parameters

@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_sgd_matches_torch_random(seed):
    r = random.Random(seed)
    compare(ours.SGD, torch.optim.SGD, random_sgd_options(r), second_group(r, "sgd"), seed, foreach=False)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_adam_matches_torch_random(seed):
    r = random.Random(100 + seed)
    compare(ours.Adam, torch.optim.Adam, random_adam_options(r), second_group(r, "adam"), seed, foreach=False)


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_adamw_matches_torch_random(seed):
    r = random.Random(200 + seed)
    compare(ours.AdamW, torch.optim.AdamW, random_adam_options(r, adamw=True), second_group(r, "adam"), seed, foreach=False)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_matches_torch_on_a_network_with_autograd(name):
    "The same comparison with gradients from backward() through a tanh network, random hyper-parameters."
    seed = ["SGD", "Adam", "AdamW"].index(name)
    r = random.Random(300 + seed)
    options = random_sgd_options(r) if name == "SGD" else random_adam_options(r, adamw=name == "AdamW")
    compare(getattr(ours, name), getattr(torch.optim, name), options, second_group(r, name.lower()), seed,
            problem=mlp_problem, foreach=False)


# ---------------------------------------------------------------- trajectories: every option named

SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, dampening=0),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.6),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "everything": dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.1, maximize=True),
    "momentum+dampening+weight_decay": dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=1e-3),
}
ADAM_CASES = {
    "default": (ours.Adam, torch.optim.Adam, dict()),
    "l2_weight_decay": (ours.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
    "decoupled": (ours.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "amsgrad": (ours.Adam, torch.optim.Adam, dict(lr=0.05, amsgrad=True, betas=(0.5, 0.9))),
    "maximize": (ours.Adam, torch.optim.Adam, dict(lr=0.01, maximize=True, eps=1e-3)),
    "adamw_default": (ours.AdamW, torch.optim.AdamW, dict()),
    "adamw_amsgrad": (ours.AdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.3, amsgrad=True)),
    "large_lr_chaotic": (ours.Adam, torch.optim.Adam, dict(lr=0.7, betas=(0.0, 0.6))),
}


@pytest.mark.parametrize("name", SGD_CASES)
def test_sgd_options_match_torch(name):
    compare(ours.SGD, torch.optim.SGD, SGD_CASES[name], {"lr": 0.03}, seed=7)


@pytest.mark.parametrize("name", ADAM_CASES)
def test_adam_options_match_torch(name):
    mine, theirs, opts = ADAM_CASES[name]
    compare(mine, theirs, opts, {"lr": 3e-3}, seed=8)     # torch's default foreach choice (single-tensor on CPU)


def test_sanity_a_different_hyperparameter_is_detected():
    "The comparison can fail: change one hyper-parameter a little and the trajectories differ."
    params, fill_grads = random_problem(0)
    for mk_ours, mk_torch in [(lambda ps: ours.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.89)),
                              (lambda ps: ours.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
                              (lambda ps: ours.Adam(ps, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.99))),
                              (lambda ps: ours.AdamW(ps, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01))]:
        with pytest.raises(AssertionError):
            torch.testing.assert_close(trajectory(mk_ours, params, fill_grads, 50), trajectory(mk_torch, params, fill_grads, 50), **TOL)


# ---------------------------------------------------------------- construction: signature, defaults, errors

@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_signature_matches_torch(name):
    "Same argument names, order, kinds and defaults as torch.optim (ours omits foreach/fused/capturable/differentiable)."
    mine = inspect.signature(getattr(ours, name)).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    for arg, p in mine.items():
        assert arg in theirs, f"{name}({arg}=...) does not exist in torch.optim.{name}"
        assert p.kind == theirs[arg].kind and p.default == theirs[arg].default, arg
    positional = lambda ps: [a for a, p in ps.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional(mine) == positional(theirs)


BAD_ARGUMENTS = [
    ("SGD", dict(lr=-0.1)), ("SGD", dict(lr=0.1, momentum=-0.9)), ("SGD", dict(lr=0.1, weight_decay=-1e-4)),
    ("SGD", dict(lr=0.1, nesterov=True)), ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("Adam", dict(lr=-1e-3)), ("Adam", dict(eps=-1e-8)), ("Adam", dict(betas=(1.0, 0.999))), ("Adam", dict(betas=(-0.1, 0.999))),
    ("Adam", dict(betas=(0.9, 1.0))), ("Adam", dict(weight_decay=-0.1)),
    ("AdamW", dict(lr=-1e-3)), ("AdamW", dict(betas=(0.9, 1.5))), ("AdamW", dict(weight_decay=-0.01)),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGUMENTS)
def test_bad_arguments_raise_like_torch(name, kwargs):
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError) as theirs: getattr(torch.optim, name)(p, **kwargs)
    with pytest.raises(ValueError) as mine: getattr(ours, name)(p, **kwargs)
    assert str(mine.value) == str(theirs.value)


def test_empty_parameter_list_raises():
    with pytest.raises(ValueError): ours.SGD([], lr=0.1)


def test_param_groups_get_defaults_and_can_be_added():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = ours.Adam([a], lr=0.01, betas=(0.8, 0.9))
    opt.add_param_group({"params": [b], "lr": 0.1})
    assert opt.param_groups[1]["betas"] == (0.8, 0.9) and opt.param_groups[1]["lr"] == 0.1
    assert ours.AdamW([a]).param_groups[0]["weight_decay"] == 0.01
    assert ours.AdamW([a]).param_groups[0]["decoupled_weight_decay"] is True


# ---------------------------------------------------------------- behaviour: grads, closure, schedulers

@pytest.mark.parametrize("make", [lambda ps: ours.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: ours.Adam(ps, weight_decay=0.1), lambda ps: ours.AdamW(ps)])
def test_params_without_grad_are_left_alone(make):
    params, _, loss_fn = mlp_problem(3)
    ps = [p.clone().requires_grad_() for p in params]
    opt = make(ps)
    before = ps[4].detach().clone()
    for step in range(3):
        opt.zero_grad(); loss_fn(ps, step).backward()
        grads = [p.grad.clone() for p in ps[:4]]
        opt.step()
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, ps[:4])), "step() must not modify .grad"
    assert torch.equal(ps[4].detach(), before) and ps[4] not in opt.state


def test_closure_returns_the_loss_like_torch():
    params, _, loss_fn = mlp_problem(4)
    results = []
    for cls in (ours.Adam, torch.optim.Adam):
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, lr=0.01)
        def closure():
            opt.zero_grad(); loss = loss_fn(ps, 0); loss.backward(); return loss
        results.append((opt.step(closure).item(), torch.cat([p.detach().flatten() for p in ps])))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], **TOL)


def test_lr_scheduler_drives_ours_like_torch():
    params, fill_grads = random_problem(5)
    def run(cls):
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        for step in range(100):
            fill_grads(ps, step); opt.step(); sched.step()
        return torch.cat([p.detach().flatten() for p in ps]), opt.param_groups[0]["lr"]
    (mine, lr_mine), (theirs, lr_theirs) = run(ours.SGD), run(torch.optim.SGD)
    assert lr_mine == lr_theirs
    torch.testing.assert_close(mine, theirs, **TOL)


# ---------------------------------------------------------------- state_dict

def run_steps(opt, ps, fill_grads, steps, start=0):
    for step in range(start, start + steps):
        fill_grads(ps, step); opt.step()


STATEFUL = [(ours.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
            (ours.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
            (ours.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
            (ours.AdamW, torch.optim.AdamW, dict(lr=0.01, betas=(0.5, 0.9)))]


@pytest.mark.parametrize("cls_ours,cls_torch,opts,first,second",
                         [(*case, "ours", "ours") for case in STATEFUL] + [(*case, "torch", "ours") for case in STATEFUL[1:3]]
                         + [(*case, "ours", "torch") for case in STATEFUL[::3]])
def test_state_dict_round_trip(cls_ours, cls_torch, opts, first, second):
    "Save after 100 steps, load into a fresh optimizer (ours or torch's), continue: same as 200 uninterrupted steps."
    make = {"ours": cls_ours, "torch": cls_torch}
    params, fill_grads = random_problem(6)
    ps = [p.clone().requires_grad_() for p in params]
    opt = make[first](groups(ps, {"lr": 0.02}), **opts)
    run_steps(opt, ps, fill_grads, 100)
    saved = copy.deepcopy(opt.state_dict())
    ps2 = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = make[second](groups(ps2, {"lr": 0.02}), **opts)
    opt2.load_state_dict(saved)
    run_steps(opt2, ps2, fill_grads, 100, start=100)

    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = cls_torch(groups(ref, {"lr": 0.02}), **opts)
    run_steps(ref_opt, ref, fill_grads, 200)
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in ps2]), torch.cat([p.detach().flatten() for p in ref]), **TOL)


def test_state_holds_the_named_buffers():
    p = torch.ones(3, requires_grad=True)
    for opt, keys in [(ours.SGD([p], lr=0.1, momentum=0.9), {"momentum_buffer"}), (ours.SGD([p], lr=0.1), set()),
                      (ours.Adam([p]), {"step", "exp_avg", "exp_avg_sq"}),
                      (ours.AdamW([p], amsgrad=True), {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})]:
        p.grad = torch.ones(3)
        opt.step()
        assert set(opt.state.get(p, {})) == keys


# ---------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls_ours,cls_torch,opts", [(ours.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                                     (ours.Adam, torch.optim.Adam, dict(lr=1e-3, amsgrad=True)),
                                                     (ours.AdamW, torch.optim.AdamW, dict(lr=1e-3))])
def test_matches_torch_on_cuda(cls_ours, cls_torch, opts):
    "On CUDA torch defaults to its foreach kernels (other rounding), so a well-behaved problem, still to 1e-10."
    params, fill_grads = random_problem(9, device="cuda")
    mine = trajectory(lambda ps: cls_ours(ps, **opts), params, fill_grads)
    theirs = trajectory(lambda ps: cls_torch(ps, **opts), params, fill_grads)
    assert mine.device.type == "cuda"
    torch.testing.assert_close(mine, theirs, **TOL)
