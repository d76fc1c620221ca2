"""Loading HF folders in every weight format, safely; saving HF folders transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kogpt.core.layout import Layout
from kogpt.hf.folder import CheckpointError
from kogpt.hf.hub import resolve
from kogpt.hf.load import load
from kogpt.hf.save import save_model
from kogpt.hf.convert import config_from_hf

from conftest import make_hf_model

ATOL = 1e-4


@pytest.fixture
def ids():
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(5))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@torch.no_grad()
def test_saved_folder_loads_in_transformers_with_same_logits(hf_dir, ids, tmp_path):
    import transformers

    ours = load(hf_dir)
    out = tmp_path / "saved"
    save_model(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(hf_logits(theirs, ids), ours(ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(load(out)(ids), ours(ids), atol=0, rtol=0)  # exact round trip


@torch.no_grad()
def test_sharded_safetensors(hf_model, ids, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(load(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_pytorch_model_bin(hf_model, ids, tmp_path):
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(load(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_bare_gpt2model_names_without_transformer_prefix(ids, tmp_path):
    """Old GPT-2 checkpoints store `h.0.attn...` without the `transformer.` prefix."""
    hf_model = make_hf_model("gpt2")
    hf_model.config.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf_model.state_dict().items()
          if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path)(ids), hf_logits(hf_model, ids), atol=ATOL, rtol=0)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_is_never_executed(hf_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hf_model.config.save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": Boom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load(tmp_path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_choice_and_checkpoint_default(hf_dir, dtype, tmp_path, ids):
    model = load(hf_dir, Layout(dtype))
    assert {p.dtype for p in model.parameters()} == {dtype}
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    again = load(tmp_path)  # default: the checkpoint's dtype
    assert again.wte.weight.dtype == dtype
    ref = load(hf_dir)(ids)
    assert (again(ids).float() - ref).abs().max() < 0.25  # still the same model, in half precision


def test_missing_and_corrupt_files_name_the_file(hf_dir, tmp_path):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[:-100])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load(hf_dir)
    (hf_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(hf_dir)
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(hf_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 4}))
    with pytest.raises(CheckpointError, match="no weights"):
        load(empty)


def test_negative_shape_in_a_safetensors_header_is_refused(hf_dir):
    path = hf_dir / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = [-d for d in header[name]["shape"]]  # the same element count, so the sizes agree
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=f"model.safetensors is not a readable safetensors file.*{name}"):
        load(hf_dir)


def test_missing_tensor_and_wrong_shape(hf_model, tmp_path, family):
    hf_model.config.save_pretrained(tmp_path)
    tied = family == "gpt2"
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()
          if "ln_f" not in k and not (tied and k == "lm_head.weight")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight.*missing"):
        load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 999
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load(tmp_path)


def test_unsupported_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load(tmp_path)
    with pytest.raises(ValueError, match="activation_function"):
        config_from_hf({"model_type": "gpt2", "activation_function": "relu"})


def test_finetuning_dropout_follows_the_config_as_transformers_does(tmp_path):
    """The rate transformers would finetune with: the folder's resid_pdrop, else the class default."""
    import transformers

    from kogpt.hf.folder import load_dropout
    from kogpt.core.config import GPTConfig
    from kogpt.core.model import GPT

    for cfg in (transformers.GPT2Config(), transformers.GPTJConfig(), transformers.GPT2Config(resid_pdrop=0.25)):
        folder = tmp_path / f"{cfg.model_type}-{cfg.resid_pdrop}"
        cfg.save_pretrained(folder)
        assert load_dropout(folder) == cfg.resid_pdrop
        raw = json.loads((folder / "config.json").read_text())
        del raw["resid_pdrop"]  # a minimal config.json: the class default applies
        (folder / "config.json").write_text(json.dumps(raw))
        assert load_dropout(folder) == type(cfg)().resid_pdrop
    assert {transformers.GPT2Config().resid_pdrop, transformers.GPTJConfig().resid_pdrop} == {0.1, 0.0}
    save_model(GPT(GPTConfig.preset("tiny-gpt2")), tmp_path / "ours")  # what kogpt saves trains without
    assert load_dropout(tmp_path / "ours") == 0.0


def test_resolve_local_and_bad_names(hf_dir):
    assert resolve(hf_dir) == hf_dir
    with pytest.raises(CheckpointError, match="model folder not found: ./nope"):
        resolve("./nope")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve(hf_dir / "config.json")


def _run_offline(code: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_offline_gives_one_clear_error(tmp_path):
    r = _run_offline("from kogpt.hf.hub import resolve\nresolve('skt/kogpt2-base-v2')", tmp_path)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "CheckpointError" in last and "hf download skt/kogpt2-base-v2" in last


def test_hub_id_resolves_from_the_hub_cache(hf_dir, ids, tmp_path):
    """The hub code path for real: a snapshot in the HF cache layout is found by repo id + revision."""
    snap = tmp_path / "hub" / "models--skt--kogpt2-base-v2" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in hf_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    refs = snap.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    code = ("from kogpt.hf.hub import resolve\n"
            "print(resolve('skt/kogpt2-base-v2'))\nprint(resolve('skt/kogpt2-base-v2', revision='main'))")
    r = _run_offline(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(snap)] * 2


def test_bundled_model_names_resolve_to_the_package_folder(hf_dir, tmp_path, monkeypatch):
    import kogpt.hf.hub as hub

    models = tmp_path / "models"
    (models / "mini").mkdir(parents=True)
    for f in hf_dir.iterdir():
        (models / "mini" / f.name).write_bytes(f.read_bytes())
    (models / "empty").mkdir()  # a folder without config.json is not a model
    monkeypatch.setattr(hub, "BUNDLED", models)
    assert hub.bundled_models() == ["mini"]
    assert resolve("mini") == models / "mini"
    with pytest.raises(CheckpointError, match="not found: empty"):
        resolve("empty")


@pytest.mark.parametrize("chunk", [20, 4096])
def test_casting_loads_read_through_a_small_buffer(hf_dir, monkeypatch, chunk):
    """A bf16 load of an fp32 file casts through a buffer of _CHUNK_BYTES (odd sizes split rows)."""
    import kogpt.hf.weights

    whole = load(hf_dir, Layout(torch.float32))
    monkeypatch.setattr(kogpt.hf.weights, "_CHUNK_BYTES", chunk)
    cast = load(hf_dir, Layout(torch.bfloat16))
    for (n, a), (m, b) in zip(sorted(whole.state_dict().items()), sorted(cast.state_dict().items())):
        assert n == m and b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), n


def test_building_on_meta_skips_init_only_inside_the_context():
    from kogpt.core.config import GPTConfig
    from kogpt.core.layout import on_meta
    from kogpt.core.model import GPT

    with on_meta():
        m = GPT(GPTConfig.preset("tiny-gpt2"))
    assert m.wte.weight.is_meta
    t = torch.empty(1000)
    torch.nn.init.normal_(t)  # outside the context init works again
    assert t.std() > 0.5
