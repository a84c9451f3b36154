"""launch/train.py turns its command-line options into the right gcomp.register keywords.

The options are checked where they leave train.py (the call to ``gcomp.register``), so no process
group or model is needed; the states themselves are tested elsewhere.
"""
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import train  # noqa: E402


def registered_options(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict:
    """The keyword arguments train.py hands to gcomp.register for ``argv`` (for a tiny CharLM)."""
    captured: dict = {}

    def fake_register(ddp, method, **options):
        captured.update(method=method, **options)
        return None

    monkeypatch.setattr(train.gcomp, "register", fake_register)
    ddp_stand_in = types.SimpleNamespace(module=train.CharLM(train.CharLMConfig.preset("tiny")))
    train.register_method(ddp_stand_in, train.parse_arguments(argv))
    return captured


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16", "float16"])
def test_topk_value_dtype_reaches_the_state(monkeypatch, value_dtype):
    options = registered_options(monkeypatch, ["--method", "topk", "--value-dtype", value_dtype])
    assert options["method"] == "topk" and options["value_dtype"] == value_dtype


def test_auto_passes_value_dtype_to_its_topk_candidate(monkeypatch):
    options = registered_options(monkeypatch, ["--method", "auto", "--value-dtype", "bfloat16"])
    assert options["topk_options"]["value_dtype"] == "bfloat16"


def test_value_dtype_default_leaves_the_method_default(monkeypatch):
    assert "value_dtype" not in registered_options(monkeypatch, ["--method", "topk"])
    assert "value_dtype" not in registered_options(monkeypatch, ["--method", "auto"])["topk_options"]


def test_unknown_value_dtype_is_refused():
    with pytest.raises(SystemExit):
        train.parse_arguments(["--method", "topk", "--value-dtype", "int8"])


def test_dense_vectors_sends_every_one_dimensional_parameter_dense(monkeypatch):
    model = train.CharLM(train.CharLMConfig.preset("tiny"))
    vectors = {name for name, parameter in model.named_parameters() if parameter.dim() < 2}
    matrices = {name for name, parameter in model.named_parameters() if parameter.dim() >= 2}
    assert vectors and matrices
    options = registered_options(monkeypatch, ["--method", "topk", "--density", "0.02", "--dense-vectors"])
    assert options["layer_densities"] == {name: 1.0 for name in vectors}
    assert options["density"] == 0.02
    assert "layer_densities" not in registered_options(monkeypatch, ["--method", "topk"])


@pytest.mark.parametrize("argv", [
    ["--method", "topk", "--dense-vectors", "--adaptive"],
    ["--method", "quantize", "--dense-vectors"],
])
def test_dense_vectors_is_refused_where_it_cannot_apply(monkeypatch, argv):
    with pytest.raises(ValueError, match="--dense-vectors"):
        registered_options(monkeypatch, argv)


def test_heterogeneous_ranks_draw_training_windows_from_their_own_part_only():
    """--heterogeneous: rank r of W reads only the r-th contiguous W-th of the training text; the
    validation windows stay identical on every rank."""
    from gcomp.examples.charlm import Batches

    corpus = torch.arange(12_000)  # token value = its position, so a window says where it came from
    context, world = 16, 3
    train_end = int(len(corpus) * 0.9)
    part = train_end // world
    shared = Batches(corpus, context, 64, seed=0, rank=0)
    for rank in range(world):
        batches = Batches(corpus, context, 64, seed=0, rank=rank, partition=(rank, world))
        for _ in range(20):
            inputs, targets = batches.next()
            assert int(inputs.min()) >= rank * part and int(targets.max()) < (rank + 1) * part
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches.validation_batches(2), shared.validation_batches(2)))
    assert train.parse_arguments(["--heterogeneous"]).heterogeneous
    assert not train.parse_arguments([]).heterogeneous


@pytest.mark.parametrize("partition", [(3, 3), (-1, 2), (0, 0)])
def test_a_bad_partition_is_refused(partition):
    from gcomp.examples.charlm import Batches

    with pytest.raises(ValueError, match="partition"):
        Batches(torch.arange(12_000), 16, 4, seed=0, rank=0, partition=partition)


def test_the_lstm_preset_is_a_recurrent_language_model_that_learns_with_sgd():
    """--model lstm: the non-transformer workload (no attention), trained with SGD + momentum."""
    from gcomp.examples.charlm import CharLSTM, build_model, language_model_loss

    model, context = build_model("lstm")
    assert isinstance(model, CharLSTM) and context == 64
    assert not any(isinstance(module, torch.nn.MultiheadAttention) for module in model.modules())
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (4, context + 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(30):  # one batch again and again: the loss must fall
        optimizer.zero_grad()
        loss = language_model_loss(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses
    with pytest.raises(ValueError, match="lstm"):
        build_model("transformer-xl")


def test_precondition_betas_reach_the_local_adamw(monkeypatch):
    import gcomp

    options = registered_options(monkeypatch, ["--method", "quantize", "--bits", "1", "--precondition", "--precondition-betas", "0.9", "0.99"])
    assert isinstance(options["precondition"], gcomp.LocalAdamW) and options["precondition"].betas == (0.9, 0.99)
    assert registered_options(monkeypatch, ["--method", "quantize", "--precondition"])["precondition"] == "adamw"
    with pytest.raises(ValueError, match="--precondition-betas"):
        registered_options(monkeypatch, ["--method", "quantize", "--precondition-betas", "0.9", "0.99"])


def test_precondition_momentum_goes_with_sgd(monkeypatch):
    import gcomp

    options = registered_options(monkeypatch, ["--method", "topk", "--optimizer", "sgd", "--precondition", "momentum"])
    assert isinstance(options["precondition"], gcomp.LocalMomentum) and options["precondition"].momentum == train.SGD_MOMENTUM
    options = registered_options(monkeypatch, ["--method", "topk", "--optimizer", "sgd", "--precondition", "momentum", "--sgd-momentum", "0.5"])
    assert options["precondition"].momentum == 0.5
    with pytest.raises(SystemExit):  # argparse's error: AdamW has no SGD momentum to set
        train.parse_arguments(["--method", "topk", "--sgd-momentum", "0.5"])
    for argv in (["--method", "topk", "--precondition", "momentum"], ["--method", "topk", "--optimizer", "sgd", "--precondition"]):
        with pytest.raises(ValueError, match="--precondition momentum goes with --optimizer sgd"):
            registered_options(monkeypatch, argv)


def test_precondition_lion_takes_its_betas(monkeypatch):
    import gcomp

    options = registered_options(monkeypatch, ["--method", "quantize", "--bits", "1", "--precondition", "lion", "--precondition-betas", "0.95", "0.98"])
    assert isinstance(options["precondition"], gcomp.LocalLion) and options["precondition"].betas == (0.95, 0.98)
    assert registered_options(monkeypatch, ["--method", "quantize", "--precondition", "lion"])["precondition"] == "lion"
    with pytest.raises(ValueError, match="--precondition momentum goes with --optimizer sgd"):
        registered_options(monkeypatch, ["--method", "quantize", "--optimizer", "sgd", "--precondition", "lion"])


def test_estimate_start_reaches_the_hook(monkeypatch):
    options = registered_options(monkeypatch, ["--method", "topk", "--feedback", "ef21", "--estimate-start", "zero"])
    assert options["estimate_start"] == "zero"
    assert "estimate_start" not in registered_options(monkeypatch, ["--method", "quantize", "--feedback", "ef21"])  # the hook's default
    with pytest.raises(ValueError, match="--estimate-start"):
        registered_options(monkeypatch, ["--method", "powersgd", "--estimate-start", "zero"])
