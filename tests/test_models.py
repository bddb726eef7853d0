"""Models: built-in output shapes, dropout, causal attention, the user-model hook and the preflight."""

from __future__ import annotations

import textwrap
import uuid

import pytest
import torch
import torch.nn.functional as F

from orchestrator.data import DataInfo, load_data
from orchestrator.errors import BadInput
from orchestrator.models import build_model, check_model
from orchestrator.spec import build_spec

DIGITS = DataInfo("classification", (1, 8, 8), 10, None, True, {"train": 1, "val": 0, "test": 0}, {})
TABULAR = DataInfo("regression", (5,), None, None, False, {"train": 1, "val": 0, "test": 0}, {})
TOKENS = DataInfo("lm", (12,), None, 50, False, {"train": 1, "val": 0, "test": 0}, {})


def model_spec(name, task=None, **model):
    data = {"name": "synthetic", "task": task} if task else {"name": "digits"}
    return build_spec({"model": {"name": name, "hidden": 16, **model}, "data": data})


CASES = [
    ("mlp", None, DIGITS, torch.rand(3, 1, 8, 8), (3, 10)),
    ("cnn", None, DIGITS, torch.rand(3, 1, 8, 8), (3, 10)),
    ("resnet", None, DIGITS, torch.rand(3, 1, 8, 8), (3, 10)),
    ("mlp", "regression", TABULAR, torch.rand(3, 5), (3,)),
    ("gpt", "lm", TOKENS, torch.randint(0, 50, (3, 12)), (3, 12, 50)),
]


@pytest.mark.parametrize("name, task, info, x, shape", CASES)
def test_builtin_output_shapes(name, task, info, x, shape):
    model = build_model(model_spec(name, task, layers=3, context=16), info)
    assert model(x).shape == shape


@pytest.mark.parametrize("name, task, info, x, shape", CASES)
def test_dropout_is_applied_in_training_only(name, task, info, x, shape):
    torch.manual_seed(0)
    model = build_model(model_spec(name, task, dropout=0.5, context=16), info)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    still = build_model(model_spec(name, task, dropout=0.0, context=16), info).train()
    assert torch.equal(still(x), still(x))


def test_gpt_attention_is_causal():
    torch.manual_seed(0)
    model = build_model(model_spec("gpt", "lm", layers=2, heads=4, context=16), TOKENS).eval()
    x = torch.randint(0, 50, (2, 12))
    changed = x.clone()
    changed[:, 7] = (x[:, 7] + 1) % 50
    a, b = model(x), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_calls_sdpa_with_is_causal(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    build_model(model_spec("gpt", "lm", layers=2, context=16), TOKENS)(torch.randint(0, 50, (1, 12)))
    assert seen == [True, True]


def test_gpt_context_must_hold_the_sequence():
    with pytest.raises(BadInput, match=r"^model\.context: 8 is shorter than the data's sequence length 12$"):
        build_model(model_spec("gpt", "lm", context=8), TOKENS)


def test_image_models_need_images():
    with pytest.raises(BadInput, match=r"^model\.name: cnn needs image inputs"):
        build_model(model_spec("cnn"), TABULAR)


def test_mlp_learns_synthetic_classification():
    torch.manual_seed(0)
    spec = build_spec(
        {
            "data": {"name": "synthetic", "task": "classification", "samples": 1000, "num_classes": 3},
            "model": {"name": "mlp", "hidden": 32},
            "train": {"batch_size": 50},
        }
    )
    splits = load_data(spec)
    model = build_model(spec, splits.info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(8):
        for x, y in splits.train.batches(epoch, 0, 1):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    x, y = map(torch.cat, zip(*splits.val.batches(0, 0, 1), strict=False))
    assert (model(x).argmax(1) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------------------------
# User models


def write_module(tmp_path, body: str) -> str:
    name = f"usermodel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_user_model_gets_options_and_info(tmp_path):
    mod = write_module(
        tmp_path,
        """
        import math
        import torch.nn as nn
        def with_info(width, info):
            return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(info.input_shape), width), nn.Linear(width, info.num_classes))
        def without_info(width):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.Linear(width, 10))
    """,
    )
    for fn in ("with_info", "without_info"):
        spec = build_spec({"model": {"name": f"{mod}:{fn}", "options": {"width": 7}}})
        model = build_model(spec, DIGITS, base_dir=tmp_path)
        assert model[1].out_features == 7
        assert check_model(spec, DIGITS, base_dir=tmp_path) == sum(p.numel() for p in model.parameters())


def test_user_model_errors_name_model_name(tmp_path):
    mod = write_module(
        tmp_path,
        """
        import torch.nn as nn
        def not_a_module():
            return "nope"
        def wrong_head():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    """,
    )
    with pytest.raises(BadInput, match=r"^model\.name: .*not_a_module' returned str, not a torch\.nn\.Module$"):
        build_model(build_spec({"model": {"name": f"{mod}:not_a_module"}}), DIGITS, base_dir=tmp_path)
    with pytest.raises(BadInput, match=r"^model\.name: cannot import 'missing_mod_q:f' from "):
        build_model(build_spec({"model": {"name": "missing_mod_q:f"}}), DIGITS, base_dir=tmp_path)
    with pytest.raises(
        BadInput, match=r"^model\.name: .* gives output \(2, 3\) for a batch of 2; classification needs \(2, 10\)$"
    ):
        check_model(build_spec({"model": {"name": f"{mod}:wrong_head"}}), DIGITS, base_dir=tmp_path)
