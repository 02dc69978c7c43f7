"""param_groups (galorax.torch.targets): the Hugging Face Trainer's optim_target_modules."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from galorax.torch import GaLoreAdamW, param_groups  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = torch.nn.Linear(d, d)
        self.v_proj = torch.nn.Linear(d, d, bias=False)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d)
        )
        self.norm = torch.nn.LayerNorm(d)


class Tiny(torch.nn.Module):
    def __init__(self, d: int = 8, vocab: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([Block(d), Block(d)])
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], [f"layers.{i}.{m}_proj.weight" for i in (0, 1) for m in "qv"]),
        # a list entry is a substring ('mlp' -> the Linear modules inside it) or a full regex
        (["mlp"], [f"layers.{i}.mlp.{j}.weight" for i in (0, 1) for j in (0, 2)]),
        ([r"layers\.1\..*_proj"], ["layers.1.q_proj.weight", "layers.1.v_proj.weight"]),
        # a string is one regex matched against the whole name
        (r"layers\.0\.q_proj", ["layers.0.q_proj.weight"]),
    ],
)
def test_target_modules_select_linear_weights(targets, expected):
    model = Tiny()
    plain, galore = param_groups(model, targets, rank=4)
    assert _names(model, galore["params"]) == expected
    # Every parameter exactly once, the rest (biases, norms, embedding) in the plain group.
    everything = {id(p) for p in model.parameters()}
    assert len(plain["params"]) + len(galore["params"]) == len(everything)
    assert {id(p) for p in plain["params"]} | {id(p) for p in galore["params"]} == everything
    assert "rank" not in plain
    assert (galore["rank"], galore["update_proj_gap"], galore["scale"], galore["proj_type"]) == (
        4,
        200,
        0.25,
        "std",
    )


def test_all_linear_shared_weight_and_errors():
    model = Tiny()
    plain, galore = param_groups(
        model,
        "all-linear",
        rank=2,
        update_proj_gap=10,
        scale=1.0,
        proj_type="reverse_std",
        moments="keep",
    )
    # the tied head weight is the embedding's: it is targeted (head is an nn.Linear), once
    assert sum(p is model.embed.weight for p in galore["params"]) == 1
    assert all(p is not model.embed.weight for p in plain["params"])
    assert galore["moments"] == "keep" and galore["proj_type"] == "reverse_std"
    opt = GaLoreAdamW(param_groups(model, ["q_proj"], rank=2), lr=1e-2)
    model.embed(torch.tensor([1, 2])).sum().backward()
    opt.step()  # the groups build an optimizer
    with pytest.raises(ValueError, match="no nn.Linear"):
        param_groups(model, ["norm"])
    with pytest.raises(TypeError):
        param_groups(model, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        param_groups(model, ["q_proj"], rnak=2)
