"""`unimodal convert`: a released-layout folder (golden set A, DiT split into two shards) -> pipeline folder.

The converted folder must reproduce the golden end-to-end token ids (recorded noise, released
settings), and bad input must fail with one clear error each.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from prior.checkpoints.released import (
    RELEASE_RECORD,
    convert_released,
    load_pipeline,
    load_released_pipeline,
    read_safetensors_folder,
)
from prior.cli import main as cli_main
from prior.eval.generative import generation_config
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.sampling.block_sampler import BlockSampler

os.environ.setdefault("HF_HUB_OFFLINE", "1")


GOLDEN = Path(__file__).resolve().parent / "data/golden/A"

EOS, PAD = 199, 299  # generate_e2e.json settings
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_tokenizer(path: Path, size: int = 300) -> None:
    """A word-level tokenizer with exactly ``size`` ids; EOS / PAD under non-conventional names."""
    vocab = {f"w{i}": i for i in range(size)}
    for name, token_id in (("[EOS]", EOS), ("[PAD]", PAD)):
        if token_id < size:
            del vocab[f"w{token_id}"]
            vocab[name] = token_id
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def make_released(root: Path, vae_config: dict | None = None) -> Path:
    """golden/A laid out as released: DiT in two shards + index, VAE single file, tokenizer.json."""
    dit = root / "cola_dit"
    dit.mkdir(parents=True)
    shutil.copy(GOLDEN / "cola_dit/config.json", dit / "config.json")
    state = load_file(GOLDEN / "cola_dit/model.safetensors")
    keys = sorted(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    weight_map = {}
    for shard, part in zip(SHARDS, halves):
        save_file({k: state[k].contiguous() for k in part}, dit / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    (dit / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    shutil.copytree(GOLDEN / "cola_vae", root / "cola_vae")
    if vae_config is not None:
        config = json.loads((GOLDEN / "cola_vae/config.json").read_text())
        (root / "cola_vae/config.json").chmod(0o644)
        (root / "cola_vae/config.json").write_text(json.dumps({**config, **vae_config}))
    write_tokenizer(root / "tokenizer.json")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("convert")
    src = make_released(tmp / "released")
    return convert_released(src, tmp / "pipeline", eos_token_id=EOS, pad_token_id=PAD)


def test_sharded_folder_reads_every_tensor(tmp_path):
    src = make_released(tmp_path / "released")
    state, origin = read_safetensors_folder(src / "cola_dit")
    golden = load_file(GOLDEN / "cola_dit/model.safetensors")
    assert sorted(state) == sorted(golden)
    assert set(origin.values()) == set(SHARDS)
    assert all(torch.equal(state[k], golden[k]) for k in golden)


@pytest.mark.parametrize("name", ["generate_e2e", "generate_e2e_extra"])
def test_converted_pipeline_reproduces_golden_generation(converted, name):
    meta = json.loads((GOLDEN / f"{name}.json").read_text())
    ref = load_file(GOLDEN / f"{name}.safetensors")
    s = meta["settings"]
    pipe = ColaTextPipeline.from_pretrained(converted)
    # the special ids come from the converted folder's tokenizer; im_end is given only in _extra
    assert pipe.tokenizer.pad_token_id == s["pad_token_id"] == PAD
    stops = [i for i in (s["eos_token_id"], s["im_end_token_id"]) if i is not None]
    overrides = {} if s["im_end_token_id"] is None else {"stop_token_ids": stops}
    assert overrides or pipe.stop_token_ids() == stops
    # the converted pipeline's own generation config is the released preset; the json's numbers on top
    assert pipe.generation_config == generation_config(released=True)
    config = pipe.resolve_generation_config(
        num_inference_steps=s["timestep_num"], guidance_scale=s["guidance_scale"],
        max_new_tokens=s["max_new_tokens"], **overrides,
    )  # fmt: skip
    assert config.stop_rule == "released" and config.repetition_penalty == s["repetition_penalty"]
    noise = [ref[f"block{k}_noise"] for k in range(1, meta["num_blocks_generated"] + 1)]
    out = BlockSampler(pipe.text_modality, pipe.prior, pipe.scheduler, config).sample(
        meta["prompt_ids"], noise=noise
    )
    assert out.token_ids == meta["generated_ids_trimmed"]
    assert out.num_blocks == meta["num_blocks_generated"]


def test_release_record_and_normalisation_come_across(tmp_path):
    src = make_released(tmp_path / "released", vae_config={"scaling_factor": 0.5, "shifting_factor": 0.25})
    out = convert_released(src, tmp_path / "pipe", eos_token_id=EOS, pad_token_id=PAD)
    record = json.loads((out / RELEASE_RECORD).read_text())
    assert record["special_token_ids"] == {"eos": EOS, "pad": PAD, "im_end": None}
    assert record["latent_normalization"] == {"scaling_factor": 0.5, "shifting_factor": 0.25}
    pipe = load_pipeline(out)
    assert pipe.release_record == record
    vae = pipe.text_vae
    assert (vae.config.scaling_factor, vae.config.shifting_factor) == (0.5, 0.25)
    ids = torch.tensor([[1, 2, 3, 4]])
    encoded = vae.encode(ids)
    assert torch.allclose(encoded.latents, (encoded.mean - 0.25) * 0.5)


def test_released_folder_loads_directly(tmp_path, converted):
    src = make_released(tmp_path / "released")
    direct = load_pipeline(src, eos_token_id=EOS, pad_token_id=PAD)
    saved = load_pipeline(converted)
    assert direct.release_record is not None
    for a, b in ((direct.prior, saved.prior), (direct.text_vae, saved.text_vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_convert(tmp_path, capsys):
    src = make_released(tmp_path / "released")
    args = ["convert", str(src), str(tmp_path / "out"), "--eos-id", str(EOS), "--pad-id", str(PAD)]
    assert cli_main(args) == 0
    assert (tmp_path / "out/model_index.json").is_file()
    assert "converted" in capsys.readouterr().out
    assert cli_main(args) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad input


def test_missing_cola_vae(tmp_path):
    src = make_released(tmp_path / "released")
    shutil.rmtree(src / "cola_vae")
    with pytest.raises(FileNotFoundError, match="no cola_vae/ folder"):
        load_released_pipeline(src, eos_token_id=EOS, pad_token_id=PAD)


def test_shard_missing_a_key_named_by_the_index(tmp_path):
    src = make_released(tmp_path / "released")
    shard = src / "cola_dit" / SHARDS[1]
    state = load_file(shard)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, shard)
    with pytest.raises(ValueError, match=f"lacks key '{dropped}'.*index.json"):
        load_released_pipeline(src, eos_token_id=EOS, pad_token_id=PAD)


def test_required_weight_absent(tmp_path):
    src = make_released(tmp_path / "released")
    index_path = src / "cola_dit/model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop("txt_out.proj.weight")
    index_path.write_text(json.dumps(index))
    state = load_file(src / "cola_dit" / shard)
    save_file({k: v for k, v in state.items() if k != "txt_out.proj.weight"}, src / "cola_dit" / shard)
    with pytest.raises(ValueError, match="required weight 'txt_out.proj.weight' is missing"):
        load_released_pipeline(src, eos_token_id=EOS, pad_token_id=PAD)


def test_shape_mismatch(tmp_path):
    src = make_released(tmp_path / "released")
    path = src / "cola_vae/model.safetensors"
    path.chmod(0o644)
    state = load_file(path)
    state["decoder.final_layer.bias"] = torch.zeros(7)
    save_file(state, path)
    with pytest.raises(ValueError, match="shape mismatch for 'decoder.final_layer.bias'"):
        load_released_pipeline(src, eos_token_id=EOS, pad_token_id=PAD)


def test_tokenizer_vocabulary_mismatch(tmp_path):
    src = make_released(tmp_path / "released")
    write_tokenizer(src / "tokenizer.json", size=280)
    with pytest.raises(ValueError, match="280 token ids but .*vocab_size 300"):
        load_released_pipeline(src, pad_token_id=None)


def test_tokenizer_without_eos_needs_an_id(tmp_path):
    src = make_released(tmp_path / "released")
    with pytest.raises(ValueError, match="no eos token"):
        load_released_pipeline(src)
