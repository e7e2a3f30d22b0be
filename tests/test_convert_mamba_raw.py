"""zoo.convert on mamba_ssm's raw checkpoints (state-spaces/mamba-*: config.json in mamba_ssm's
schema + pytorch_model.bin), and the refusal of any pickle that holds more than tensors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import zoo
from zoo.cli import app
from zoo.convert import (
    MAMBA_RAW_TO_ZOO,
    convert_checkpoint,
    from_raw_mamba,
    is_raw_mamba_config,
    load_tensor_file,
    mamba_hf_config_from_raw,
)

ATOL = 1e-5
VOCAB, PADDED = 50, 56  # the raw config says 50; MambaLMHeadModel pads to a multiple of 8
RAW_CONFIG = {
    "d_model": 32,
    "n_layer": 2,
    "vocab_size": VOCAB,
    "ssm_cfg": {"d_state": 4, "dt_init": "random", "dt_scale": 1.0},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
runner = CliRunner()


def hf_mamba(seed: int = 0) -> transformers.MambaForCausalLM:
    """The tiny model a raw checkpoint is written from (transformers' MambaForCausalLM)."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=PADDED,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=4,
        use_bias=False,
        tie_word_embeddings=True,
        initializer_range=0.1,  # logits of order 1, so that atol 1e-5 is a tight check
        pad_token_id=0,
    )
    model = transformers.MambaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm gains, D and A_log start constant; make a swap show
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", ".A_log")):
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


def write_raw(model: transformers.MambaForCausalLM, folder: Path, **config) -> Path:
    """`model` as mamba_ssm's `MambaLMHeadModel.save_pretrained` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {
        key.replace("backbone.embeddings.", "backbone.embedding."): tensor.clone()
        for key, tensor in model.state_dict().items()
    }
    assert "lm_head.weight" in state_dict and "backbone.embedding.weight" in state_dict
    torch.save(state_dict, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({**RAW_CONFIG, **config}))
    return folder


def ids(seed: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def test_raw_config_maps_to_transformers_mamba():
    assert is_raw_mamba_config(RAW_CONFIG)
    assert not is_raw_mamba_config({**RAW_CONFIG, "model_type": "mamba"})
    hf = mamba_hf_config_from_raw(RAW_CONFIG)
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers) == (PADDED, 32, 2)
    assert (hf.state_size, hf.conv_kernel, hf.expand, hf.time_step_rank) == (4, 4, 2, 2)
    assert hf.tie_word_embeddings and not hf.use_bias and hf.use_conv_bias
    # mamba_ssm's defaults for an empty ssm_cfg (the released checkpoints' config.json).
    default = mamba_hf_config_from_raw({"d_model": 768, "n_layer": 24, "vocab_size": 50277})
    assert (default.vocab_size, default.state_size, default.time_step_rank) == (50280, 16, 48)


def test_raw_checkpoint_converts_with_the_same_logits_and_generation(tmp_path):
    hf = hf_mamba()
    src = write_raw(hf, tmp_path / "raw")
    dst = tmp_path / "zoo"
    assert convert_checkpoint(src, dst) == MAMBA_RAW_TO_ZOO
    model = zoo.MambaForCausalLM.from_pretrained(dst).eval()
    assert model.config.vocab_size == PADDED and model.config.mamba_d_state == 4
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32
    x = ids()
    with torch.no_grad():
        diff = (model(input_ids=x).logits - hf(input_ids=x).logits).abs().max().item()
    assert diff <= ATOL, f"max abs logit difference {diff:.3g} > {ATOL}"
    prompt = ids(seed=5, length=7)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(prompt, **kwargs)
        got = model.generate(prompt, **kwargs)
    assert expected.shape == (2, 27)
    assert torch.equal(got, expected)


def test_raw_checkpoint_from_the_command_line(tmp_path):
    src = write_raw(hf_mamba(seed=1), tmp_path / "raw")
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "zoo")])
    assert result.exit_code == 0, result.output
    assert f"({MAMBA_RAW_TO_ZOO})" in result.output


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg.layer"),
        ({"rms_norm": False}, "rms_norm"),
        ({"d_intermediate": 64}, "d_intermediate"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx"),
        ({"ssm_cfg": {"d_state": 4, "chunk_size": 64}}, "ssm_cfg.chunk_size"),
        ({"mystery": 1}, "mystery"),
    ],
    ids=["mamba2", "layernorm", "mlp", "attention", "ssm-field", "top-field"],
)
def test_refused_in_one_line_before_any_weight_is_read(tmp_path, monkeypatch, override, field):
    src = write_raw(hf_mamba(), tmp_path / "raw", **override)
    # No weight may be read: a refusal that reached the weights would fail differently.
    monkeypatch.setattr(
        "zoo.convert.load_tensor_file", lambda path: pytest.fail(f"read weights from {path}")
    )
    with pytest.raises(ValueError) as refused:
        convert_checkpoint(src, tmp_path / "out")
    message = str(refused.value)
    assert "\n" not in message and f"field {field}=" in message, message
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], lines


# ---------------------------------------------------------------------------- pickle payloads


def _write_marker(path: str) -> None:
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


def _tampered(kind: str, marker: Path) -> bytes | dict:
    if kind == "pickle":  # a bare (legacy, non-zip) pickle
        return pickle.dumps({"backbone.embedding.weight": _Payload(marker)}, protocol=2)
    return {"backbone.embedding.weight": torch.zeros(2), "x": _Payload(marker)}  # torch.save


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_a_pickle_payload_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "PWNED"
    # The payload is live: a plain unpickler runs it.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()

    src = write_raw(hf_mamba(), tmp_path / "raw")
    weights = src / "pytorch_model.bin"
    payload = _tampered(kind, marker)
    if isinstance(payload, bytes):
        weights.write_bytes(payload)
    else:
        torch.save(payload, weights)
    with pytest.raises(ValueError) as refused:
        convert_checkpoint(src, tmp_path / "out")
    message = str(refused.value)
    assert "pytorch_model.bin" in message and "refused" in message and "\n" not in message
    if kind == "torch-zip":  # names the global it would have called
        assert "Unsupported global: GLOBAL tests.test_convert_mamba_raw._write_marker" in message
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        load_tensor_file(weights)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin"):
        from_raw_mamba(src)
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 2 and "pytorch_model.bin" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not marker.exists()


def test_safetensors_weights_are_preferred(tmp_path):
    from safetensors.torch import save_file

    hf = hf_mamba(seed=2)
    src = write_raw(hf, tmp_path / "raw")
    state_dict = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state_dict["lm_head.weight"]  # safetensors refuses shared storage; tied anyway
    save_file({k: v.contiguous() for k, v in state_dict.items()}, src / "model.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"not read")
    model = from_raw_mamba(src)
    x = ids(seed=3)
    with torch.no_grad():
        diff = (model(input_ids=x).logits - hf(input_ids=x).logits).abs().max().item()
    assert diff <= ATOL


def test_weights_that_do_not_fit_the_config_are_refused_in_one_line(tmp_path):
    src = write_raw(hf_mamba(), tmp_path / "raw", pad_vocab_size_multiple=16)  # 64 rows, not 56
    with pytest.raises(ValueError) as refused:
        convert_checkpoint(src, tmp_path / "out")
    message = str(refused.value)
    assert "do not match config.json" in message and "\n" not in message, message
    assert "backbone.embedding" in message or "embed_tokens" in message, message
    assert not (tmp_path / "out").exists()
