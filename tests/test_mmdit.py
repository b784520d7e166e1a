"""prior.models.mmdit.MMDiT: cache equivalence, 2L block causality, CFG batching, backends, modalities, I/O."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from prior.checkpoints.released import load_released_prior as load_released_dit
from prior.checkpoints.released_format import (
    DIT_WEIGHTS,
    convert_released_dit_state_dict,
    dit_from_released_config,
    ours_to_released,
    released_dit_shapes,
    released_to_ours,
)
from prior.models.mmdit import MMDiT
from unimodal.attention import rope_inv_freq
from unimodal.config import load_config, schema_from_signature
from unimodal.kv_cache import KVCache
from unimodal.masks import block_causal_mask, two_l_mask

TINY = dict(in_channels=[4], width=32, heads=2, head_dim=16, rope_dim=8, num_layers=2, block_size=4)


def tiny(seed: int = 0, **overrides) -> MMDiT:
    """A tiny model with the released init plus noise on every parameter (no path is zero/identity)."""
    torch.manual_seed(seed)
    model = MMDiT(**{**TINY, "attn_backend": "eager", "adaln_zero_init": False, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def with_backend(model: MMDiT, backend: str) -> MMDiT:
    twin = MMDiT.from_config({**model.config, "attn_backend": backend})
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- config


def test_signature_is_the_config_schema():
    schema = schema_from_signature(MMDiT)
    cfg = load_config(schema, overrides=["width=32", "heads=2", "head_dim=16", "rope_dim=8", "num_layers=1",
                                         "modalities=[text,image]", "in_channels=[4,6]"])  # fmt: skip
    model = MMDiT(**vars(cfg))
    assert list(model.config.modalities) == ["text", "image"] and model.config.width == 32


def test_timestep_forms_agree():
    model, x = tiny(), torch.randn(2, 8, 4)
    per_token = model(x, torch.full((2, 8), 420.0)).velocity
    close(model(x, torch.tensor([420.0, 420.0])).velocity, per_token)
    close(model(x, 420.0).velocity, per_token)
    close(model({"text": x}, {"text": torch.full((2, 8), 420.0)}).velocity["text"], per_token)


def test_adaln_zero_init_starts_at_zero_velocity():
    model = MMDiT(**TINY)  # adaln_zero_init=True by default
    assert torch.count_nonzero(model(torch.randn(2, 8, 4), 500.0).velocity) == 0
    released_init = MMDiT(**TINY, adaln_zero_init=False)
    assert torch.count_nonzero(released_init(torch.randn(2, 8, 4), 500.0).velocity) > 0


# ----------------------------------------------------------------------------- KV cache


@torch.no_grad()
def test_cached_equals_uncached():
    """[prefix | block] in one forward (timestep 0 on the prefix) == prefill, read-only step, commit, step."""
    model, bs = tiny(), 4
    lengths = [8, 4]  # ragged prefixes, padded to 8
    prefix = torch.randn(2, 8, 4)
    prefix_valid = torch.arange(8)[None] < torch.tensor(lengths)[:, None]
    block1, block1_clean, block2 = torch.randn(2, bs, 4), torch.randn(2, bs, 4), torch.randn(2, bs, 4)
    t1, t2 = torch.rand(2, bs) * 1000, torch.rand(2, bs) * 1000

    cache = KVCache(model.config.num_layers)
    model(prefix, 0.0, valid=prefix_valid, kv_cache=cache, update_cache=True)
    v1 = model(block1, t1, kv_cache=cache).velocity
    assert cache.lengths().tolist() == lengths  # a read-only pass writes nothing
    model(block1_clean, 0.0, kv_cache=cache, update_cache=True)  # commit
    v2 = model(block2, t2, kv_cache=cache).velocity
    assert cache.lengths().tolist() == [n + bs for n in lengths]

    for i, n in enumerate(lengths):  # full no-cache forwards, one sample at a time
        seq = torch.cat((prefix[i, :n], block1[i]))[None]
        t = torch.cat((torch.zeros(n), t1[i]))[None]
        close(model(seq, t).velocity[0, n:], v1[i])
        seq = torch.cat((prefix[i, :n], block1_clean[i], block2[i]))[None]
        t = torch.cat((torch.zeros(n + bs), t2[i]))[None]
        close(model(seq, t).velocity[0, n + bs :], v2[i])


@torch.no_grad()
def test_cfg_batched_forward_equals_separate_calls():
    model = tiny()
    cache = KVCache(model.config.num_layers)
    valid = torch.arange(8)[None] < torch.tensor([[8], [5]])
    model(torch.randn(2, 8, 4), 0.0, valid=valid, kv_cache=cache, update_cache=True)
    x, t = torch.randn(2, 4, 4), torch.rand(2, 4) * 1000
    cond = model(x, t, kv_cache=cache).velocity
    uncond = model(x, t).velocity  # the block alone, positions 0..bs-1
    both = model(torch.cat((x, x)), torch.cat((t, t)), kv_cache=cache, context_free_rows=2).velocity
    with pytest.raises(ValueError, match="KV cache holds batch 2 but 4 rows read it"):
        model(torch.cat((x, x)), torch.cat((t, t)), kv_cache=cache)  # the rows that stand alone are explicit
    close(both[:2], cond)
    close(both[2:], uncond)
    assert (cond - uncond).abs().max() > 1e-3  # the history matters, so the check is not vacuous


# ----------------------------------------------------------------------------- 2L training pass


def two_l_inputs(batch: int = 2, length: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z0, zt = torch.randn(batch, length, 4, generator=g), torch.randn(batch, length, 4, generator=g)
    x = torch.cat((z0, zt), 1)  # (B, 2L)
    t = torch.cat((torch.zeros(batch, length), torch.rand(batch, length, generator=g) * 1000), 1)
    positions = torch.arange(length).repeat(2).expand(batch, -1)
    noisy = torch.arange(2 * length).expand(batch, -1) >= length
    return x, t, positions, noisy


@torch.no_grad()
def test_2l_block_b_never_sees_later_blocks():
    """Perturbing block b+1 (clean or noisy copy) never changes an output of blocks <= b (either copy)."""
    model, bs, length = tiny(), 4, 12
    x, t, positions, noisy = two_l_inputs(length=length)
    mask = two_l_mask(positions, noisy, bs)
    base = model(x, t, positions=positions, attn_mask=mask).velocity
    block = positions // bs
    for b in range(length // bs - 1):
        for noisy_copy in (False, True):
            touched = (block == b + 1) & (noisy if noisy_copy else ~noisy)
            x2, t2 = x.clone(), t.clone()
            x2[touched] += torch.randn_like(x2[touched])
            t2[touched & noisy] = torch.rand(int((touched & noisy).sum())) * 1000
            out = model(x2, t2, positions=positions, attn_mask=mask).velocity
            close(out[block <= b], base[block <= b], atol=1e-6)
            # not vacuous: a clean block is context for every later noisy block; a noisy block for itself only
            seen_by = touched if noisy_copy else (block > b + 1) & noisy
            if seen_by.any():
                assert (out[seen_by] - base[seen_by]).abs().max() > 1e-3
            if noisy_copy:
                close(out[~touched], base[~touched], atol=1e-6)


@torch.no_grad()
def test_2l_noisy_block_equals_cached_inference_view():
    """Noisy block b in the 2L pass == a plain block-causal forward over [clean blocks < b | noisy b]."""
    model, bs, length = tiny(), 4, 12
    x, t, positions, noisy = two_l_inputs(length=length)
    v = model(x, t, positions=positions, attn_mask=two_l_mask(positions, noisy, bs)).velocity
    for b in range(length // bs):
        lo, hi = b * bs, (b + 1) * bs
        seq = torch.cat((x[:, :lo], x[:, length + lo : length + hi]), 1)
        ts = torch.cat((t[:, :lo], t[:, length + lo : length + hi]), 1)
        close(model(seq, ts).velocity[:, lo:], v[:, length + lo : length + hi])


# ----------------------------------------------------------------------------- backends


@torch.no_grad()
def test_attention_backends_agree():
    eager = tiny()
    x, t, positions, noisy = two_l_inputs()
    valid = torch.ones_like(noisy)
    valid[1, 10:12] = valid[1, 22:] = False  # padding in both copies of sample 1
    prefix_valid = torch.arange(8)[None] < torch.tensor([[8], [3]])
    prefix, block, tb = torch.randn(2, 8, 4), torch.randn(2, 4, 4), torch.rand(2, 4) * 1000

    def run(model):
        mask = two_l_mask(positions, noisy, torch.tensor([4, 2]), valid)
        train = model(x, t, positions=positions, valid=valid, attn_mask=mask).velocity[valid]
        cache = KVCache(model.config.num_layers)
        model(prefix, 0.0, valid=prefix_valid, kv_cache=cache, update_cache=True)
        return train, model(block, tb, kv_cache=cache).velocity

    reference = run(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns on CPU
        for backend in ("sdpa", "flex"):
            for got, want in zip(run(with_backend(eager, backend)), reference):
                close(got, want)


# ----------------------------------------------------------------------------- modalities


@torch.no_grad()
def test_two_modalities_joint_attention_with_separate_weights():
    model = tiny(modalities=["text", "image"], in_channels=[4, 6])
    for name in ("embed_in", "blocks.0.streams", "final"):
        text = {k: v for k, v in model.named_parameters() if k.startswith(f"{name}.text.")}
        image = {k: v for k, v in model.named_parameters() if k.startswith(f"{name}.image.")}
        assert text and image
        assert not {p.data_ptr() for p in text.values()} & {p.data_ptr() for p in image.values()}

    image, text = torch.randn(2, 8, 6), torch.randn(2, 5, 4)
    positions = {"image": torch.zeros(2, 8, dtype=torch.long), "text": torch.arange(1, 6).expand(2, -1)}
    x, t = {"text": text, "image": image}, {"text": 700.0, "image": torch.zeros(2, 8)}
    out = model(x, t, positions=positions).velocity
    assert out["text"].shape == (2, 5, 4) and out["image"].shape == (2, 8, 6)
    text_only = model({"text": text}, 700.0, positions={"text": positions["text"]}).velocity["text"]

    with torch.no_grad():  # change only the image stream's weights
        for p in model.blocks[0].streams["image"].parameters():
            p.add_(torch.randn_like(p))
    out2 = model(x, t, positions=positions).velocity
    assert (out2["text"] - out["text"]).abs().max() > 1e-3  # text attends to image tokens jointly
    close(model({"text": text}, 700.0, positions={"text": positions["text"]}).velocity["text"], text_only)
    with pytest.raises(ValueError, match="dict"):
        model(text, 700.0)


# ----------------------------------------------------------------------------- I/O


def test_save_from_pretrained_round_trip(tmp_path):
    model = tiny(modalities=["text", "image"], in_channels=[4, 6])
    model.save_pretrained(tmp_path)
    loaded = MMDiT.from_pretrained(tmp_path).eval()
    assert {k: loaded.config[k] for k in model.config if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    x = {"text": torch.randn(1, 5, 4), "image": torch.randn(1, 3, 6)}
    with torch.no_grad():
        for key in x:
            # same weights; not bitwise: MKL GEMMs may round differently on differently aligned storage
            close(loaded(x, 300.0).velocity[key], model(x, 300.0).velocity[key], atol=1e-6)


def test_gradient_checkpointing_same_grads():
    model, x = tiny().train(), torch.randn(2, 8, 4)
    model(x, 300.0).velocity.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, 300.0).velocity.square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        close(p.grad, g)


def released_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """Our weights under the released key names (docs/released-format.md §3 table): the inverse of the converter."""
    sd, width, out = model.state_dict(), model.config.width, {}
    names = {"embed_in.text": "txt_in.proj", "time_embed": "emb_in", "final.text.norm": "txt_out_norm",
             "final.text.ada": "txt_out_ada.out_in.1", "final.text.proj": "txt_out.proj",
             "streams.text.qkv": "msa.proj_qkv", "streams.text.proj": "msa.proj_out",
             "streams.text.norm_": "msa.norm_", "streams.text.mlp.fc_": "mlp.proj_"}  # fmt: skip
    for key, value in sd.items():
        if ".ada." in key and key.startswith("blocks"):
            block, param = key.split(".")[1], key.rsplit(".", 1)[1]
            for head, part in zip(
                ("msa_in", "msa_out", "mlp_in", "mlp_out"), value.split([2 * width, width] * 2)
            ):
                out[f"blocks.{block}.ada.{head}.1.{param}"] = part.clone()
            continue
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        out[key] = value.clone()
    for i in range(model.config.num_layers):
        out[f"blocks.{i}.msa.rope.rope.freqs"] = rope_inv_freq(model.config.rope_dim, 1e4)
    return out


RELEASED_CFG = dict(txt_in_channels=4, txt_out_channels=4, txt_dim=32, emb_dim=32, heads=2, head_dim=16,
                    expand_ratio=4, num_layers=2, norm_eps=1e-5, qk_bias=False, patch_size=1, rope_dim=8,
                    block_size=4, model_type="cola_dit")  # fmt: skip


def write_released(folder, cfg: dict, sd: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"))


def test_released_checkpoint_round_trip(tmp_path):
    model = tiny()
    sd = released_state_dict(model)
    assert len(sd) == 8 + 2 * 19 + 6  # the released key count for 2 layers
    converted = convert_released_dit_state_dict(sd)
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())
    write_released(tmp_path / "dit", RELEASED_CFG, sd)
    loaded = load_released_dit(tmp_path / "dit", attn_backend="eager")
    x = torch.randn(2, 8, 4)
    with torch.no_grad():
        close(loaded(x, 100.0).velocity, model(x, 100.0).velocity, atol=1e-6)


def test_one_released_table_both_directions():
    """The released-format table maps every key both ways and agrees with a hand-written inverse."""
    model = tiny()
    hand_made = released_state_dict(model)
    expected = {k: tuple(v.shape) for k, v in hand_made.items() if not k.endswith("rope.freqs")}
    assert released_dit_shapes(model) == expected
    for ours in model.state_dict():
        names = ours_to_released(ours)
        assert all(name in hand_made for name in names)
        if len(names) == 1:  # renamed weights round-trip; the stacked adaLN maps to its four heads
            assert released_to_ours(names[0]) == ours
    assert released_to_ours("txt_in.proj.weight", modality="image") == "embed_in.image.weight"
    assert released_to_ours("blocks.0.extra") is None and len(DIT_WEIGHTS) == 9
    with pytest.raises(ValueError, match="no released name"):
        ours_to_released("blocks.0.streams.text.extra.weight")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"emb_dim": 64}, "emb_dim"),
        ({"patch_size": 2}, "patch_size"),
        ({"txt_out_channels": 8}, "txt_out_channels"),
        ({"mystery": 1}, "mystery"),
    ],
)
def test_released_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        dit_from_released_config({**RELEASED_CFG, **change})


def test_released_weight_errors(tmp_path):
    sd = released_state_dict(tiny())
    bad_shape = {**sd, "blocks.1.mlp.proj_in.weight": torch.zeros(128, 31)}
    write_released(tmp_path / "shape", RELEASED_CFG, bad_shape)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.proj_in\.weight"):
        load_released_dit(tmp_path / "shape")
    missing = {k: v for k, v in sd.items() if k != "txt_out.proj.bias"}
    write_released(tmp_path / "missing", RELEASED_CFG, missing)
    with pytest.raises(ValueError, match=r"final\.text\.proj\.bias"):
        load_released_dit(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"blocks\.0\.ada\.mlp_out\.1\.bias"):
        convert_released_dit_state_dict({k: v for k, v in sd.items() if k != "blocks.0.ada.mlp_out.1.bias"})
    with pytest.raises(ValueError, match="unknown released DiT key 'blocks.0.extra'"):
        convert_released_dit_state_dict({**sd, "blocks.0.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="RoPE"):
        convert_released_dit_state_dict({**sd, "blocks.0.msa.rope.rope.freqs": torch.ones(4)})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_released_dit(tmp_path / "nowhere")


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 8, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"x\['text'\]"):
        model(torch.randn(2, 8, 5), 0.0)
    with pytest.raises(ValueError, match="update_cache"):
        model(torch.randn(2, 8, 4), 0.0, update_cache=True)
    with pytest.raises(ValueError, match="layers"):
        model(torch.randn(2, 8, 4), 0.0, kv_cache=KVCache(3))
    with pytest.raises(ValueError, match="attn_backend"):
        MMDiT(**TINY, attn_backend="magic")
    mask = block_causal_mask(torch.arange(4)[None], torch.arange(4)[None], 4)
    with pytest.raises(ValueError, match="mask covers"):
        model(torch.randn(1, 8, 4), 0.0, attn_mask=mask)


@torch.no_grad()
def test_adaln_cache_reuses_outputs_and_changes_nothing():
    from prior.models.timestep import AdaLNCache

    model = tiny(adaln_zero_init=False).eval()
    x = torch.randn(2, 8, model.config.in_channels[0])
    cache = AdaLNCache()
    calls = []
    handle = model.time_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        for t in (torch.tensor([300.0, 700.0]), torch.tensor([300.0, 700.0]), torch.tensor([0.0, 700.0])):
            ref = model(x, t).velocity
            torch.testing.assert_close(model(x, t, adaln_cache=cache).velocity, ref, atol=0, rtol=0)
    finally:
        handle.remove()
    # without the cache: 3 embeddings; with it: one per distinct timestep set (2 of 3 calls)
    assert len(calls) == 3 + 2 and len(cache) == 2


@pytest.mark.slow
@torch.no_grad()
def test_compiled_streams_equal_eager():
    """compile_streams (inductor, weights frozen) gives the eager velocity, with and without a cache."""
    model = tiny(adaln_zero_init=False).eval()
    x = torch.randn(2, 8, model.config.in_channels[0])
    t = torch.tensor([300.0, 700.0])
    cache = KVCache(model.config.num_layers)
    eager = model(x, t).velocity
    model(x, torch.zeros(2), kv_cache=cache, update_cache=True)  # commit, then read it
    eager_cached = model(x, t, kv_cache=cache).velocity
    model.compile_streams(freezing=True, dynamic=False)
    torch.testing.assert_close(model(x, t).velocity, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, t, kv_cache=cache).velocity, eager_cached, atol=1e-5, rtol=1e-5)
