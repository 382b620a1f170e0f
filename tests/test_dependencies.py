"""The installed releases work together, and when they do not, the user reads one line naming them.

References: the requirements each installed distribution declares (``pip check``'s rule), and the
real peft / transformers / diffusers stack the trainer uses.
"""

from __future__ import annotations

import pytest

from latentdiff import compat
from latentdiff.compat import DependencyError


def test_no_declared_requirement_is_broken():
    problems = compat.declared_conflicts()
    assert not problems, "\n".join(problems)


def test_declared_conflicts_names_both_releases(monkeypatch):
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda name: "0.0.1" if name == "safetensors" else real(name))
    problems = compat.declared_conflicts()
    line = next(p for p in problems if "safetensors" in p)
    assert "latentdiff" in line and "but safetensors 0.0.1 is installed" in line and "\n" not in line


def test_require_names_the_pair_and_the_fix(monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda name: "0.15.0" if name == "peft" else None)
    with pytest.raises(DependencyError) as e:
        compat.require("peft", "0.17", "LoRA training")
    msg = str(e.value)
    assert "\n" not in msg and "peft 0.15.0 is installed" in msg and "pip install -U 'peft>=0.17'" in msg
    with pytest.raises(DependencyError, match="not installed"):
        compat.require("tensorboard", "2.15", "TensorBoard logs")


def test_lora_with_too_old_peft_is_one_line_before_any_work(monkeypatch, tiny):
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda name: "0.10.0" if name == "peft" else real(name))
    from latentdiff.models.lora import add_lora_adapter

    with pytest.raises(DependencyError, match=r"LoRA training needs peft >= .*peft 0\.10\.0 is installed"):
        add_lora_adapter(tiny.text_encoder, rank=2, alpha=2, targets=["q_proj"])
    assert not any("lora" in n for n, _ in tiny.text_encoder.named_parameters())


def test_lora_injects_with_the_installed_stack(tiny):
    """transformers' own add_adapter may gate on a newer peft than the index serves; ours must not."""
    import copy

    import torch

    from latentdiff.models.lora import add_lora_adapter

    text = copy.deepcopy(tiny.text_encoder)
    add_lora_adapter(text, rank=2, alpha=2, targets=["q_proj", "v_proj"])
    trainable = [n for n, p in text.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[0, 5, 7, 1]])
    with torch.no_grad():  # B starts at zero: the adapted encoder equals the base one
        assert torch.equal(text(ids)[0], tiny.text_encoder(ids)[0])
    with pytest.raises(ValueError, match="match no layer"):
        add_lora_adapter(copy.deepcopy(tiny.text_encoder), rank=2, alpha=2, targets=["nonexistent_proj"])
