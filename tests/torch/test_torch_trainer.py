"""The Hugging Face Trainer recipes of docs/torch.md, on a tiny random Llama (no hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from galorax.torch import (  # noqa: E402
    ApolloAdamW,
    GaLoreAdamW,
    LayerwiseOptimizer,
    apollo_param_groups,
    param_groups,
)

TARGETS = ["attn", "mlp"]


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


def _data(n=16, length=12):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, max_grad_norm, accum=2):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accum,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=1,
        max_grad_norm=max_grad_norm,
        weight_decay=0.0,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )


def _groups(model):
    return param_groups(model, TARGETS, rank=4, update_proj_gap=2, scale=0.25)


def _train(tmp_path, model, args, **trainer_kw):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), **trainer_kw)
    result = trainer.train()
    assert result.global_step == 4
    return trainer


def test_trainer_with_galore_adamw(tmp_path):
    model = _model()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = _args(tmp_path, max_grad_norm=1.0)
    # The docs' recipe: three lines.
    opt = GaLoreAdamW(_groups(model), lr=args.learning_rate)
    trainer = _train(tmp_path, model, args, optimizers=(opt, None))
    q = model.model.layers[0].self_attn.q_proj.weight
    state = opt.state[q]
    assert state["step"] == 4 and tuple(state["projector"].shape) == (32, 4)
    assert not torch.equal(q.detach(), before)
    # The Trainer's scheduler drives this optimizer's learning rates.
    assert opt.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    assert opt.param_groups[0]["lr"] < args.learning_rate


def test_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    model = _model()
    kwargs = {"params": _groups(model), "lr": 1e-2}
    trainer = _train(
        tmp_path, model, _args(tmp_path, 1.0), optimizer_cls_and_kwargs=(GaLoreAdamW, kwargs)
    )
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(opt, GaLoreAdamW)
    assert opt.state[model.model.layers[1].mlp.up_proj.weight]["step"] == 4


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_trainer_layerwise_equals_plain(tmp_path, max_grad_norm):
    plain_model = _model()
    plain = GaLoreAdamW(_groups(plain_model), lr=1e-2)
    _train(
        tmp_path / "plain", plain_model, _args(tmp_path, max_grad_norm), optimizers=(plain, None)
    )

    model = _model()
    args = _args(tmp_path, max_grad_norm=0.0)  # the layer-wise optimizer clips, not the Trainer
    inner = GaLoreAdamW(_groups(model), lr=args.learning_rate)
    opt = LayerwiseOptimizer(
        inner,
        accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=max_grad_norm or None,
    )
    assert opt.layerwise.accumulate == ("full" if max_grad_norm else "low_rank")
    trainer = _train(tmp_path / "layerwise", model, args, optimizers=(opt, None))
    for a, b in zip(plain_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if max_grad_norm:
        assert opt.layerwise.last_grad_norm is not None
        assert opt.layerwise.last_grad_norm > max_grad_norm  # clipping was active
    assert inner.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    assert inner.state_dict().keys() == trainer.optimizer.state_dict().keys()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_trainer_with_apollo_adamw_plain_and_layerwise(tmp_path, max_grad_norm):
    # optim="apollo_adamw" / "apollo_adamw_layerwise" with optim_target_modules=TARGETS, as
    # galorax: the Trainer's APOLLO groups, its scheduler; layer-wise equals plain.
    def groups(model):
        return apollo_param_groups(model, TARGETS, rank=4, update_proj_gap=2)

    plain_model = _model()
    plain = ApolloAdamW(groups(plain_model), lr=1e-2)
    args = _args(tmp_path, max_grad_norm)
    _train(tmp_path / "plain", plain_model, args, optimizers=(plain, None))
    q = plain_model.model.layers[0].self_attn.q_proj.weight
    assert plain.state[q]["step"] == 4 and tuple(plain.state[q]["projector"].shape) == (32, 4)

    model = _model()
    args = _args(tmp_path, max_grad_norm=0.0)
    inner = ApolloAdamW(groups(model), lr=args.learning_rate)
    opt = LayerwiseOptimizer(
        inner,
        accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=max_grad_norm or None,
    )
    assert opt.layerwise.accumulate == "full"
    _train(tmp_path / "layerwise", model, args, optimizers=(opt, None))
    for a, b in zip(plain_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
