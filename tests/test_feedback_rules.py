"""Error-feedback rules on their own: several simulated workers in one process, no process group.

The "network" here is the real top-k codec (``gcomp.ops``): each worker packs its message, every
worker decodes all messages in worker order, exactly as the hook does after its allgather.
"""
import pytest
import torch

from gcomp import ops
from gcomp.feedback import ERROR, ESTIMATE, LOCAL_ESTIMATE, MOMENTUM, EControl, EF21SGDM, Exchange, make_feedback_rule

NUMEL = 200
WORKERS = 3


def _gradients(step: int) -> list[torch.Tensor]:
    """Heterogeneous per-worker gradients that drift slowly from step to step."""
    generator = torch.Generator().manual_seed(step)
    shared = torch.randn(NUMEL, generator=torch.Generator().manual_seed(99))
    return [shared + (worker + 1) * torch.randn(NUMEL, generator=generator) for worker in range(WORKERS)]


def _simulate(rule, steps: int, k: int, value_dtype=torch.float32) -> dict:
    """Run ``rule`` on WORKERS simulated workers; return per-step outputs and per-step states."""
    stored = [dict() for _ in range(WORKERS)]
    outputs, states = [], []
    for step in range(steps):
        gradients = _gradients(step)
        if not rule.is_initialised(stored[0]):
            mean_gradient = torch.stack(gradients).sum(0) / WORKERS
            stored = [rule.dense_init(g, mean_gradient) for g in gradients]
            outputs.append([mean_gradient] * WORKERS)
            states.append(stored)
            continue
        sent = [rule.message_input(g, s) for g, s in zip(gradients, stored)]
        messages = torch.stack([ops.topk_pack(v, [0], [NUMEL], [k], value_dtype) for v in sent])
        step_outputs, new_stored = [], []
        for worker in range(WORKERS):
            own = torch.zeros(NUMEL)
            ops.sparse_unpack_add_(own, messages[worker], [0], [NUMEL], [k], value_dtype)
            mean = torch.zeros(NUMEL)
            ops.sparse_unpack_add_(mean, messages, [0], [NUMEL], [k], value_dtype, 1.0 / WORKERS)
            update = rule.update(stored[worker], Exchange(gradients[worker], sent[worker], own, mean))
            step_outputs.append(update.output)
            new_stored.append(update.stored)
        stored = new_stored
        outputs.append(step_outputs)
        states.append(stored)
    return {"outputs": outputs, "states": states}


@pytest.mark.parametrize("name", ["ef14", "ef21", "econtrol"])
def test_full_density_gives_the_mean(name):
    result = _simulate(make_feedback_rule(name, eta=0.1), steps=6, k=NUMEL)
    for step, outputs in enumerate(result["outputs"]):
        expected = torch.stack(_gradients(step)).mean(0)
        for output in outputs:
            assert torch.allclose(output, expected, rtol=1e-5, atol=1e-5), (name, step)


def test_ef14_residual_is_what_was_not_sent():
    """``g + e_old == C(g + e_old) + e_new`` on every worker, for rounded (fp16) values too."""
    rule = make_feedback_rule("ef14")
    for value_dtype in (torch.float32, torch.float16):
        stored = {}
        for step in range(8):
            gradient = _gradients(step)[0]
            sent = rule.message_input(gradient, stored)
            message = ops.topk_pack(sent, [0], [NUMEL], [10], value_dtype)
            own = torch.zeros(NUMEL)
            ops.sparse_unpack_add_(own, message, [0], [NUMEL], [10], value_dtype)
            update = rule.update(stored, Exchange(gradient, sent, own, own))
            assert torch.allclose(own + update.stored[ERROR], gradient + stored.get(ERROR, 0.0), atol=1e-6)
            stored = update.stored
        assert float(stored[ERROR].norm()) > 0


def test_ef21_sgdm_at_full_density_gives_the_mean_of_local_momenta():
    """Nothing is held back at density 1, so the output is the mean of the workers' momenta
    ``v_i = beta v_i + (1 - beta) g_i`` (started at the first, dense step's gradients)."""
    beta = 0.8
    result = _simulate(make_feedback_rule("ef21-sgdm", momentum=beta), steps=6, k=NUMEL)
    momenta = _gradients(0)
    for step, outputs in enumerate(result["outputs"]):
        if step > 0:
            momenta = [beta * v + (1 - beta) * g for v, g in zip(momenta, _gradients(step))]
        expected = torch.stack(momenta).mean(0)
        for worker, output in enumerate(outputs):
            assert torch.allclose(output, expected, rtol=1e-5, atol=1e-5), step
            assert torch.allclose(result["states"][step][worker][MOMENTUM], momenta[worker], atol=1e-6), step


def test_ef21_sgdm_estimate_is_closer_to_the_mean_gradient_than_ef21s_under_noise():
    """The reason the rule exists: with noisy minibatch gradients around a fixed mean and a low
    density, EF21's estimate chases the noise; EF21-SGDM's tracks the averaged gradient."""
    true_mean = torch.randn(NUMEL, generator=torch.Generator().manual_seed(5))

    def noisy(step: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(1000 + step)
        return [true_mean + 2.0 * torch.randn(NUMEL, generator=generator) for _ in range(WORKERS)]

    def final_error(rule) -> float:
        first = noisy(0)
        stored = [rule.dense_init(g, torch.stack(first).mean(0)) for g in first]
        errors = []
        for step in range(1, 200):
            gradients = noisy(step)
            sent = [rule.message_input(g, s) for g, s in zip(gradients, stored)]
            messages = torch.stack([ops.topk_pack(v, [0], [NUMEL], [40], torch.float32) for v in sent])
            mean = torch.zeros(NUMEL)
            ops.sparse_unpack_add_(mean, messages, [0], [NUMEL], [40], torch.float32, 1.0 / WORKERS)
            new = []
            for worker in range(WORKERS):
                own = torch.zeros(NUMEL)
                ops.sparse_unpack_add_(own, messages[worker], [0], [NUMEL], [40], torch.float32)
                update = rule.update(stored[worker], Exchange(gradients[worker], sent[worker], own, mean))
                new.append(update.stored)
            stored = new
            if step >= 150:
                errors.append(float((update.output - true_mean).norm()))
        return sum(errors) / len(errors)

    ours, ef21 = final_error(EF21SGDM(momentum=0.9)), final_error(make_feedback_rule("ef21"))
    assert ours < 0.5 * ef21, (ours, ef21)


@pytest.mark.parametrize("name", ["ef21", "econtrol", "ef21-sgdm"])
def test_replicated_estimate_tracks_local_estimates(name):
    """The replicated estimate stays the mean of the local estimates and is the same on every worker."""
    result = _simulate(make_feedback_rule(name, eta=0.05), steps=20, k=20, value_dtype=torch.bfloat16)
    for states in result["states"]:
        for state in states[1:]:
            assert torch.equal(state[ESTIMATE], states[0][ESTIMATE])
        local_mean = torch.stack([state[LOCAL_ESTIMATE] for state in states]).mean(0)
        assert torch.allclose(states[0][ESTIMATE], local_mean, atol=1e-5)


@pytest.mark.parametrize("rule", [EControl(eta=0.0), EF21SGDM(momentum=0.0)], ids=["econtrol-eta-0", "ef21-sgdm-momentum-0"])
def test_degenerate_settings_are_ef21_bit_for_bit(rule):
    ef21 = _simulate(make_feedback_rule("ef21"), steps=12, k=15)
    other = _simulate(rule, steps=12, k=15)
    for step_ef21, step_other in zip(ef21["outputs"], other["outputs"]):
        for a, b in zip(step_ef21, step_other):
            assert torch.equal(a, b)


def test_econtrol_error_accumulates_what_the_estimate_missed():
    """``e_new = e_old + (g - h_old) - D`` and ``h_new = h_old + D`` on one worker."""
    rule = EControl(eta=0.5)
    gradient = _gradients(0)[0]
    stored = rule.dense_init(gradient, gradient)
    stored = {**stored, ERROR: torch.full((NUMEL,), 0.25)}
    new_gradient = _gradients(1)[0]
    sent = rule.message_input(new_gradient, stored)
    assert torch.allclose(sent, new_gradient - stored[LOCAL_ESTIMATE] + 0.5 * stored[ERROR])
    own = torch.where(sent.abs() > sent.abs().median(), sent, torch.zeros_like(sent))
    update = rule.update(stored, Exchange(new_gradient, sent, own, own))
    assert torch.allclose(update.stored[ERROR], stored[ERROR] + new_gradient - stored[LOCAL_ESTIMATE] - own)
    assert torch.equal(update.stored[LOCAL_ESTIMATE], stored[LOCAL_ESTIMATE] + own)
    assert torch.equal(update.output, stored[ESTIMATE] + own)


def test_rules_do_not_modify_their_inputs():
    for name in ("ef14", "ef21", "econtrol", "ef21-sgdm"):
        rule = make_feedback_rule(name, eta=0.3, momentum=0.5)
        gradient = _gradients(0)[0]
        stored = rule.dense_init(gradient, gradient * 0.5) if rule.needs_dense_init else {ERROR: torch.ones(NUMEL)}
        snapshot = {key: tensor.clone() for key, tensor in stored.items()}
        gradient_before = gradient.clone()
        sent = rule.message_input(gradient, stored)
        own = sent * 0.5
        rule.update(stored, Exchange(gradient, sent, own, own))
        assert torch.equal(gradient, gradient_before)
        for key, tensor in stored.items():
            assert torch.equal(tensor, snapshot[key]), (name, key)


@pytest.mark.parametrize("momentum", [1.0, -0.01, float("nan"), True, "0.9"])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        make_feedback_rule("ef21-sgdm", momentum=momentum)


@pytest.mark.parametrize(
    "name, eta, error, word",
    [
        ("ef22", 0.1, ValueError, "feedback"),
        (None, 0.1, TypeError, "feedback"),
        ("econtrol", -0.1, ValueError, "eta"),
        ("econtrol", float("nan"), ValueError, "eta"),
        ("econtrol", True, ValueError, "eta"),
    ],
)
def test_bad_rule_arguments(name, eta, error, word):
    with pytest.raises(error, match=word):
        make_feedback_rule(name, eta=eta)


@pytest.mark.parametrize("name", ["ef21", "econtrol", "ef21-sgdm"])
def test_a_zero_start_compresses_from_the_first_step(name):
    """``start="zero"``: no dense step; the first message is the whole gradient (EF21-SGDM: its
    first momentum), so at full density the first output is already the exact mean."""
    rule = make_feedback_rule(name, eta=0.1, momentum=0.9, start="zero")
    assert rule.is_initialised({}) and not rule.holds_state({})
    result = _simulate(rule, steps=6, k=NUMEL)
    first = torch.stack(_gradients(0)).mean(0)
    expected = first * 0.1 if name == "ef21-sgdm" else first  # the momentum starts at zero
    for output in result["outputs"][0]:
        assert torch.allclose(output, expected, rtol=1e-5, atol=1e-6), name
    assert all(rule.holds_state(state) for state in result["states"][0])
    if name != "ef21-sgdm":
        for step, outputs in enumerate(result["outputs"]):
            assert torch.allclose(outputs[0], torch.stack(_gradients(step)).mean(0), rtol=1e-5, atol=1e-5), (name, step)


@pytest.mark.parametrize("name", ["ef21", "econtrol", "ef21-sgdm"])
def test_a_zero_start_keeps_the_replicated_estimate_the_mean_of_the_local_ones(name):
    result = _simulate(make_feedback_rule(name, eta=0.05, start="zero"), steps=20, k=20, value_dtype=torch.bfloat16)
    for states in result["states"]:
        for state in states[1:]:
            assert torch.equal(state[ESTIMATE], states[0][ESTIMATE])
        local_mean = torch.stack([state[LOCAL_ESTIMATE] for state in states]).mean(0)
        assert torch.allclose(states[0][ESTIMATE], local_mean, atol=1e-5)


def test_bad_start():
    with pytest.raises(ValueError, match="estimate_start"):
        make_feedback_rule("ef21", start="random")
    assert make_feedback_rule("ef14", start="zero").is_initialised({})  # EF14 has no estimate to start
