"""`zoo convert --dry-run` / `plan_conversion`: a 7B-shaped config is checked and counted on the
meta device, and its parameters, decode state and FLOPs per token agree with the original
implementation's own counts; Hub ids resolve through huggingface_hub (mocked: no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import zoo
import zoo.convert
from tests.test_convert_transnormer import released_config
from zoo.cli import app
from zoo.convert import plan_conversion

runner = CliRunner()


def _config_folder(tmp_path: Path, fields: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return tmp_path  # config.json only: a plan never needs weights


def _close(ours: int, theirs: int, tolerance: float = 0.01) -> bool:
    return abs(ours - theirs) <= tolerance * theirs


def _hf_forward_flops_per_token(model) -> int:
    """transformers' own count: its `floating_point_ops` (4.x; gone in 5.x) was 6 · the
    non-embedding parameters per token for forward and backward, so the forward is 2 N."""
    return 2 * model.num_parameters(exclude_embeddings=True)


LLAMA_2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
)  # fmt: skip


@pytest.mark.parametrize("shape", [LLAMA_2_7B, LLAMA_3_8B], ids=["llama-2-7b", "llama-3-8b"])
def test_llama_7b_plan_matches_transformers_counts(tmp_path, shape):
    hf_config = transformers.LlamaConfig(**shape)
    hf_config.save_pretrained(tmp_path)
    seq_len = 128  # transformers' 6N leaves attention's T-dependent FLOPs out: compare at short T
    plan = plan_conversion(tmp_path, seq_len=seq_len)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    assert plan.direction == "llama->zoo_llama"
    assert plan.parameters == hf.num_parameters()  # exact
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_cache = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * seq_len
    assert plan.state_elements == kv_cache  # what transformers' DynamicCache holds, exactly
    hf_flops = _hf_forward_flops_per_token(hf)
    assert _close(plan.forward_flops_per_token, hf_flops), (plan.forward_flops_per_token, hf_flops)


def test_mamba_2_8b_plan_matches_transformers_counts(tmp_path):
    hf_config = transformers.MambaConfig(vocab_size=50280, hidden_size=2560, num_hidden_layers=64)
    hf_config.save_pretrained(tmp_path)
    plan = plan_conversion(tmp_path, seq_len=2048)
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(hf_config)
    assert plan.parameters == hf.num_parameters()
    d_inner = hf_config.intermediate_size
    # transformers' Mamba cache: conv_states (d_inner, conv_kernel) + ssm_states (d_inner, N).
    cache = hf_config.num_hidden_layers * d_inner * (hf_config.conv_kernel + hf_config.state_size)
    assert plan.state_elements == cache
    # Tied: transformers' count leaves out the embedding, which is also the LM head's matmul.
    hf_flops = _hf_forward_flops_per_token(hf) + 2 * hf.lm_head.weight.numel()
    assert _close(plan.forward_flops_per_token, hf_flops), (plan.forward_flops_per_token, hf_flops)


def test_transnormer_7b_plan_matches_the_released_architecture(tmp_path):
    """The released 7B has no counter of its own: its counts are those of its modules (qkvu
    4d×d, out d×d, GLU 3·d·g per layer, tied embedding, θ (H, D) in layer 0) and of its cache
    (`kv` (H, d_k, d_h) per layer, d_k = 2 d_h where LRPE runs)."""
    d, g, layers, heads, vocab = 4096, 11008, 30, 32, 64000
    fields = released_config(
        vocab_size=vocab, decoder_embed_dim=d, decoder_layers=layers,
        decoder_attention_heads=heads, hidden_dim=d, glu_dim=g,
        linear_use_lrpe_list=[1] + [0] * (layers - 1),
    )  # fmt: skip
    plan = plan_conversion(_config_folder(tmp_path, fields), seq_len=2048)
    assert plan.direction == "transnormer->zoo_tnl"
    block = 4 * d * d + d * d + 3 * d * g
    assert plan.parameters == vocab * d + layers * block + d
    head_dim = d // heads
    assert plan.state_elements == heads * head_dim * head_dim * (layers + 1)
    # FLOPs: 2 per weight of every matmul (the LM head included, the embedding lookup not) and
    # the recurrence, 4 · H · d_k · d_h per token and layer.
    released = 2 * (layers * block + vocab * d) + 4 * heads * head_dim * head_dim * (layers + 1)
    assert _close(plan.forward_flops_per_token, released)


def test_dry_run_from_the_command_line(tmp_path):
    transformers.LlamaConfig(**LLAMA_2_7B).save_pretrained(tmp_path)
    result = runner.invoke(app, ["convert", str(tmp_path), "--dry-run", "--seq-len", "4096"])
    assert result.exit_code == 0, result.output
    assert "llama->zoo_llama" in result.output
    assert "parameters: 6,738,415,616" in result.output  # Llama-2-7B's published count
    assert "decode state after 4,096 tokens" in result.output
    result = runner.invoke(app, ["convert", str(tmp_path)])
    assert result.exit_code != 0 and "DST is required" in result.output


def test_refusal_in_a_dry_run_is_the_conversion_refusal(tmp_path):
    fields = released_config(norm_type="layernorm")
    result = runner.invoke(app, ["convert", str(_config_folder(tmp_path, fields)), "--dry-run"])
    assert result.exit_code == 2
    assert "transnormer config field norm_type='layernorm' cannot be converted" in result.output


# ----------------------------------------------------------------------------------- Hub ids


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub's downloads served from local folders under tmp_path/hub/<org>/<name>;
    records what was asked for."""
    import huggingface_hub

    calls: list[tuple[str, str]] = []
    root = tmp_path / "hub"

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", filename))
        cache = tmp_path / "cache" / repo_id
        cache.mkdir(parents=True, exist_ok=True)
        source = root / repo_id / filename
        if not source.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(shutil.copy(source, cache / filename))

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id))
        cache = tmp_path / "cache" / repo_id
        shutil.copytree(root / repo_id, cache, dirs_exist_ok=True)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # "org/name" must not exist as a local path
    return root, calls


def test_hub_id_is_downloaded_and_converted(tmp_path, fake_hub):
    from tests.test_convert_transnormer import released_weights, write_released

    root, calls = fake_hub
    config = released_config()
    write_released(root / "OpenNLPLab" / "TransNormerLLM-tiny", config, released_weights(config))
    out = tmp_path / "converted"
    direction = zoo.convert.convert_checkpoint("OpenNLPLab/TransNormerLLM-tiny", out)
    assert direction == "transnormer->zoo_tnl"
    assert calls[0] == ("file", "config.json")  # the config first, then the weights
    assert ("snapshot", "OpenNLPLab/TransNormerLLM-tiny") in calls
    assert (out / "model.safetensors").is_file()


def test_hub_id_refused_from_its_config_without_fetching_weights(tmp_path, fake_hub):
    root, calls = fake_hub
    _config_folder(root / "org" / "model", released_config(bias=True))
    with pytest.raises(ValueError, match="bias=True"):
        zoo.convert.convert_checkpoint("org/model", tmp_path / "out")
    assert calls == [("file", "config.json")]


def test_unknown_hub_id_is_one_line(tmp_path, fake_hub):
    with pytest.raises(FileNotFoundError, match=r"^org/missing: not a local folder"):
        zoo.convert.convert_checkpoint("org/missing", tmp_path / "out")


# ------------------------------------------------------- named sizes of the released models


def _fields(config) -> dict:
    """The config fields that decide the network (not token ids, init or the context note)."""
    skip = {"initializer_range", "max_position_embeddings", "use_cache", "dtype"}
    return {k: v for k, v in config.to_dict().items() if k not in skip and "token_id" not in k}


def test_released_named_sizes_are_what_their_configs_convert_to():
    """`from_size("...-released")` and friends are the converters' own results for the released
    config.json (TransNormerLLM-7B, fla's hgrn2-1.3B, safari's hyena-small): the cards and the
    counts of a named size are those of the converted model."""
    from tests.test_convert_safari_hyena import RELEASED_LIKE
    from zoo.convert.fla_hgrn2 import config_from_fla
    from zoo.convert.safari_hyena import config_from_safari
    from zoo.convert.transnormer import config_from_transnormer

    tnl = config_from_transnormer(released_config(
        vocab_size=64000, decoder_embed_dim=4096, decoder_layers=30, decoder_attention_heads=32,
        hidden_dim=4096, glu_dim=11008, linear_use_lrpe_list=[1] + [0] * 29,
    ))  # fmt: skip
    assert _fields(tnl) == _fields(zoo.TNLConfig.from_size("7b-released"))

    fla = pytest.importorskip("fla.models")
    hgrn2 = fla.HGRN2Config(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_heads=16, expand_ratio=128,
        intermediate_size=5632, tie_word_embeddings=False,
    ).to_dict()  # fmt: skip
    assert _fields(config_from_fla(hgrn2)) == _fields(zoo.HGRN2Config.from_size("1.3b-fla"))

    hyena = config_from_safari(
        {**RELEASED_LIKE, "d_model": 864, "d_inner": 1728, "n_layer": 18, "vocab_size": 50257,
         "layer": {**RELEASED_LIKE["layer"], "emb_dim": 33, "filter_order": 64, "l_max": 2048}}
    )  # fmt: skip
    preset = zoo.HyenaConfig.from_size("153m-safari")
    assert _fields(hyena) == _fields(preset)
