"""GPU readiness, checked on CPU: bf16 autocast (trainer.precision), channels_last and
torch.compile (model.channels_last, model.compile) are each one config switch that composes
with trainer=gpu and runs a real training step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tailtune.build.config import BUILD_KEYS, module_config
from tailtune.build.models import build_experiment
from tailtune.build.trainer import build_trainer, training_callbacks

ONE_STEP = ("trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "model.unfreeze_at=0")


def _fit(cfg, run_dir: Path, model=None):
    datamodule, built = build_experiment(cfg)
    model = model or built
    trainer = build_trainer(cfg, run_dir, training_callbacks(cfg, datamodule),
                                     loggers=[])
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


def test_trainer_gpu_composes_with_every_switch(smoke_cfg):
    cfg, choices = smoke_cfg("trainer=gpu", "model.channels_last=true", "model.compile=true",
                             "model.compile_backend=aot_eager")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert choices["trainer"] == "gpu" and plain["trainer"]["accelerator"] == "gpu"
    assert plain["trainer"]["precision"] in ("bf16-mixed", "16-mixed")
    assert plain["model"]["channels_last"] is True and plain["model"]["compile"] is True
    # The switches are the pipeline's: the module's constructor never sees them.
    assert not set(BUILD_KEYS) & set(module_config(cfg.model))


def test_bf16_mixed_on_cpu_runs_training_steps_under_autocast(smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("trainer.precision=bf16-mixed", *ONE_STEP)
    _, model = build_experiment(cfg)
    dtypes: list[torch.dtype] = []
    model.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer, _ = _fit(cfg, tmp_path / "run", model)
    assert trainer.global_step == 1 and torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast


def test_channels_last_converts_weights_and_inputs_and_keeps_the_outputs(smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("model.channels_last=true", *ONE_STEP)
    base_cfg, _ = smoke_cfg(*ONE_STEP, name="base")
    datamodule, model = build_experiment(cfg)
    _, base = build_experiment(base_cfg)
    conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    images = next(iter(datamodule.val_dataloader()))[0][:4]
    assert model.preprocess(images).is_contiguous(memory_format=torch.channels_last)
    model.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), base(images), rtol=1e-4, atol=1e-4)
    trainer, _ = _fit(cfg, tmp_path / "run", model)
    assert trainer.global_step == 1
    assert set(model.state_dict()) == set(base.state_dict())  # checkpoints unchanged


@pytest.fixture
def counting_backend():
    """``aot_eager`` behind a name that counts the graphs it compiles."""
    from torch._dynamo import lookup_backend, register_backend
    from torch._dynamo.backends.registry import _COMPILER_FNS

    graphs: list[int] = []
    name = "tailtune_counting_aot_eager"

    def backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    if name not in _COMPILER_FNS:
        register_backend(backend, name=name)
    else:
        _COMPILER_FNS[name] = backend
    yield name, graphs
    torch._dynamo.reset()


def test_compile_runs_the_training_step_through_the_configured_backend(smoke_cfg, tmp_path,
                                                                        counting_backend):
    name, graphs = counting_backend
    # A tiny timm test net keeps compilation to seconds on CPU.
    small = ("backbone.name=test_efficientnet", "backbone.weights=none")
    cfg, _ = smoke_cfg("model.compile=true", f"model.compile_backend={name}", *small,
                       *ONE_STEP)
    base_cfg, _ = smoke_cfg(*small, *ONE_STEP, name="base")
    trainer, model = _fit(cfg, tmp_path / "run")
    assert trainer.global_step == 1 and graphs, "the forward never went through the backend"
    _, base = build_experiment(base_cfg)
    assert set(model.state_dict()) == set(base.state_dict())  # no _orig_mod. prefixes


@pytest.mark.parametrize(("overrides", "searched"), [
    (("model.unfreeze_at=0",), False),  # the recipe: every parameter trains from step 0
    (("model.unfreeze_at=1",), True),   # the frozen backbone gets no gradient in epoch 0
    (("model=linear_probe",), True),    # a model that does not say: DDP searches
])
def test_ddp_searches_for_idle_parameters_only_when_the_model_has_them(smoke_cfg, tmp_path,
                                                                       overrides, searched):
    """DDP's unused-parameter search is an extra pass over the autograd graph each step, and
    DDP warns when it finds nothing; a frozen backbone needs it (else DDP fails waiting for
    gradients that never come)."""
    cfg, _ = smoke_cfg("trainer=ddp_sim", *overrides)
    _, model = build_experiment(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", loggers=[], model=model)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is searched
    # Evaluation (no model given, no backward pass) keeps the search on.
    assert build_trainer(cfg, tmp_path / "ev", loggers=[]).strategy._ddp_kwargs[
        "find_unused_parameters"] is True
