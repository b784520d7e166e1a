"""The unified text-image path: layouts and masks, the 2L pass, the sampler (cached == uncached), the
pipelines (round trips, determinism, bad input)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_multimodal_pipeline, tiny_pipeline
from PIL import Image

from modalities.layout import Segment, get_layout, place_segments
from modalities.registry import LatentSequence
from prior.pipelines.pipeline_cola_multimodal import ColaImageToTextPipeline, ColaTextToImagePipeline
from prior.sampling.block_sampler import BlockSampler
from prior.sampling.config import GenerationConfig
from prior.training.flow_matching import FlowMatchingConfig
from prior.training.multimodal import MultimodalConfig, build_multimodal_2l
from unimodal.masks import block_id_mask, two_l_block_mask


def _segment(n: int, d: int, valid_lengths: list[int], block_size: int | None) -> LatentSequence:
    b = len(valid_lengths)
    pos = torch.arange(n).expand(b, n)
    valid = pos < torch.tensor(valid_lengths)[:, None]
    blocks = pos // block_size if block_size else torch.zeros_like(pos)
    return LatentSequence(torch.randn(b, n, d), valid, pos.clone(), blocks)


# ----------------------------------------------------------------------------- layouts and masks


def test_place_segments_draws_each_layout():
    text, image = _segment(6, 4, [6, 6, 3], 4), _segment(4, 8, [4, 4, 4], None)
    orders = [("text", "image"), ("image", "text"), ("text",)]
    placed = place_segments({"text": text, "image": image}, orders)
    t, i = placed["text"], placed["image"]
    # text -> image: caption positions 0..5 blocks 0 0 0 0 1 1, image positions 6..9 block 2
    assert t.positions[0].tolist() == [0, 1, 2, 3, 4, 5] and t.block_ids[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert i.positions[0].tolist() == [6, 7, 8, 9] and i.block_ids[0].tolist() == [2, 2, 2, 2]
    # image -> text: image positions 0..3 block 0, caption positions 4..9 blocks 1 1 1 1 2 2
    assert i.positions[1].tolist() == [0, 1, 2, 3] and i.block_ids[1].tolist() == [0, 0, 0, 0]
    assert t.positions[1].tolist() == [4, 5, 6, 7, 8, 9] and t.block_ids[1].tolist() == [1, 1, 1, 1, 2, 2]
    # text only: the image is absent (invalid); the caption keeps its 3 valid tokens
    assert not i.valid[2].any() and t.valid[2].tolist() == [True] * 3 + [False] * 3


def test_joint_block_causal_mask_of_each_layout():
    """The inference-time mask over a placed row: [text 6 (blocks of 4)] and [image 4 (one block)]."""
    text, image = _segment(6, 4, [6, 6, 6], 4), _segment(4, 8, [4, 4, 4], None)
    orders = [("text", "image"), ("image", "text"), ("text",)]
    placed = place_segments({"text": text, "image": image}, orders)
    blocks = torch.cat((placed["text"].block_ids, placed["image"].block_ids), 1)  # [t0..t5 | i0..i3]
    valid = torch.cat((placed["text"].valid, placed["image"].valid), 1)
    dense = block_id_mask(blocks, blocks, valid, valid).dense()[:, 0]
    drawn = {
        0: ["xxxx......", "xxxx......", "xxxx......", "xxxx......", "xxxxxx....", "xxxxxx....",
            "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"],  # text -> image: the image sees the caption
        1: ["xxxx..xxxx", "xxxx..xxxx", "xxxx..xxxx", "xxxx..xxxx", "xxxxxxxxxx", "xxxxxxxxxx",
            "......xxxx", "......xxxx", "......xxxx", "......xxxx"],  # image -> text: the image sees itself
        2: ["xxxx......", "xxxx......", "xxxx......", "xxxx......", "xxxxxx....", "xxxxxx....",
            "xxxx..xxxx", "xxxx..xxxx", "xxxx..xxxx", "xxxx..xxxx"],  # text only: the image is padding
        # (no real token sees it; padding queries may attend their block, so no row is empty)
    }  # fmt: skip
    for row, rows in drawn.items():
        expected = torch.tensor([[c == "x" for c in r] for r in rows])
        assert torch.equal(dense[row], expected), row


def test_two_l_block_mask_matches_the_drawing():
    # image->text: [image i0 i1 (block 0)][text t0 t1 (block 1)], layout [clean ; noisy]
    blocks = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]])
    noisy = torch.tensor([[False] * 4 + [True] * 4])
    drawn = [
        "xx......",
        "xx......",
        "xxxx....",
        "xxxx....",
        "....xx..",
        "....xx..",
        "xx....xx",
        "xx....xx",
    ]
    expected = torch.tensor([[c == "x" for c in row] for row in drawn])
    assert torch.equal(two_l_block_mask(blocks, noisy).dense()[0, 0], expected)


@pytest.mark.parametrize("rope_axes", [1, 2])
def test_two_l_pass_later_segment_never_changes_an_earlier_output(rope_axes):
    pipe = tiny_multimodal_pipeline(rope_axes=rope_axes)
    prior = pipe.prior
    text, image = _segment(6, 4, [6, 5], 4), _segment(16, 8, [16, 16], None)
    cfg = FlowMatchingConfig()
    eps = {"text": torch.randn(2, 6, 4), "image": torch.randn(2, 16, 8)}
    t = {"text": torch.rand(2, 6), "image": torch.rand(2, 16)}
    for order, later in ((("image", "text"), "text"), (("text", "image"), "image")):
        outs = []
        for seed in (0, 1):
            seg = {"text": text, "image": image}
            g = torch.Generator().manual_seed(seed)
            changed = seg[later]
            seg[later] = LatentSequence(torch.randn(changed.latents.shape, generator=g), changed.valid,
                                        changed.positions, changed.block_ids)  # fmt: skip
            placed = place_segments(seg, [order, order])
            batch = build_multimodal_2l(placed, list(prior.config.modalities), cfg, eps=eps, t=t,
                                        uncond=torch.zeros(2, dtype=torch.bool), rope_axes=rope_axes)  # fmt: skip
            out = prior(batch.x, batch.timestep, positions=batch.positions, valid=batch.valid,
                        attn_mask=batch.attn_mask, rope_positions=batch.rope_positions)  # fmt: skip
            outs.append(out.velocity)
        earlier = order[0]
        assert torch.allclose(outs[0][earlier], outs[1][earlier], atol=1e-6), order
        assert not torch.allclose(outs[0][later], outs[1][later], atol=1e-3)


def test_axial_coordinates_follow_the_placement():
    text, image = _segment(6, 4, [6, 3], 4), _segment(4, 8, [4, 4], None)
    image.coords = torch.stack((image.positions // 2, image.positions % 2), dim=-1)  # a 2x2 grid
    placed = place_segments({"text": text, "image": image}, [("text", "image"), ("image", "text")])
    batch = build_multimodal_2l(placed, ["text", "image"], FlowMatchingConfig(), rope_axes=2)
    rows_cols = batch.rope_positions["image"][:, :4]  # clean copy
    assert rows_cols[0].tolist() == [[6, 6], [6, 7], [7, 6], [7, 7]]  # after the 6-token caption
    assert rows_cols[1].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert batch.rope_positions["text"][1, :3].tolist() == [[4, 4], [5, 5], [6, 6]]  # 1-D: both axes
    assert build_multimodal_2l(placed, ["text", "image"], FlowMatchingConfig()).rope_positions is None


def test_registry_and_layout_refuse_unknown_names():
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        Segment("audio")
    with pytest.raises(ValueError, match="unknown layout 'video_to_text'"):
        get_layout("video_to_text")
    with pytest.raises(ValueError, match="unknown layout"):
        MultimodalConfig(layout_weights={"speech": 1.0})


# ----------------------------------------------------------------------------- the sampler


def _uncached_image(
    pipe, prompt_ids: list[int], noise: torch.Tensor, config: GenerationConfig
) -> torch.Tensor:
    """Text -> image recomputing everything each step: [clean prompt | image] vs the image alone."""
    prior, text, sched = pipe.prior, pipe.text_modality, pipe.scheduler
    n, bs, (_, m, _) = len(prompt_ids), prior.config.block_size, noise.shape
    z = text.encode_ids([prompt_ids]).latents
    grid = torch.stack((torch.arange(m) // 4, torch.arange(m) % 4), dim=-1)[None]  # (1, N, 2) on the 4x4 grid
    rope, rope_alone = {}, {}
    if prior.config.rope_axes == 2:
        rope = {"rope_positions": {"text": torch.arange(n)[None, :, None].expand(1, n, 2), "image": n + grid}}
        rope_alone = {"rope_positions": grid}
    BlockSampler.set_grid(sched, config)
    x = config.noise_scale * noise
    for t in sched.timesteps:
        cond = prior(
            {"text": z, "image": x}, {"text": torch.zeros(1, n), "image": torch.full((1, m), float(t))},
            positions={"text": torch.arange(n)[None], "image": n + torch.arange(m)[None]},
            block_ids={"text": torch.arange(n)[None] // bs, "image": torch.full((1, m), -(-n // bs))}, **rope,
        ).velocity["image"]  # fmt: skip
        alone = prior(
            {"image": x}, float(t), positions=torch.arange(m)[None], block_ids=torch.zeros(1, m), **rope_alone
        ).velocity
        v = config.guidance_scale * (cond - alone["image"]) + alone["image"]
        x = sched.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("rope_axes", [1, 2])
def test_text_to_image_cached_equals_uncached(rope_axes):
    pipe = tiny_multimodal_pipeline(rope_axes=rope_axes)
    config = GenerationConfig(num_inference_steps=4, guidance_scale=2.5)
    prompts = [[5, 9, 11, 3, 7], [8, 4]]  # ragged: 5 tokens (2 blocks, partial) and 2
    noise = torch.randn(2, 16, 8)
    out = pipe.sampler(config).text_to_image(prompts, 16, 16, noise=noise)
    for b, ids in enumerate(prompts):
        ref = _uncached_image(pipe, ids, noise[b : b + 1], config)
        assert torch.allclose(out.latents[b : b + 1], ref, atol=1e-5)
    assert out.images.shape == (2, 3, 16, 16)


def _uncached_caption_blocks(
    pipe, image: torch.Tensor, noise: list[torch.Tensor], config
) -> list[torch.Tensor]:
    """Image -> text recomputing everything: [clean image | clean blocks < k | block k] vs block k alone."""
    prior, sched, bs = pipe.prior, pipe.scheduler, pipe.prior.config.block_size
    img = pipe.image_modality.encode(image).latents  # (1, N, d)
    m, done = img.shape[1], []
    for k, eps in enumerate(noise):
        x = config.noise_scale * eps
        BlockSampler.set_grid(sched, config)
        for t in sched.timesteps:
            clean = torch.cat([*done, x], dim=1)  # (1, (k+1) bs, d)
            tt = torch.cat((torch.zeros(1, k * bs), torch.full((1, bs), float(t))), dim=1)
            cond = prior(
                {"text": clean, "image": img}, {"text": tt, "image": torch.zeros(1, m)},
                positions={"text": m + torch.arange((k + 1) * bs)[None], "image": torch.arange(m)[None]},
                block_ids={"text": 1 + torch.arange((k + 1) * bs)[None] // bs, "image": torch.zeros(1, m)},
            ).velocity["text"][:, -bs:]  # fmt: skip
            alone = prior({"text": x}, float(t), positions=torch.arange(bs)[None]).velocity["text"]
            v = config.guidance_scale * (cond - alone) + alone
            x = sched.step(v, t, x).prev_sample
        done.append(x)
    return done


@pytest.mark.parametrize("prediction", ["velocity", "categorical"])
def test_image_to_text_cached_equals_uncached(prediction):
    pipe = tiny_multimodal_pipeline(prediction=prediction)
    if prediction == "categorical":
        pipe.prior.set_token_latents(torch.randn_like(pipe.prior.token_latents))
    config = GenerationConfig(num_inference_steps=3, guidance_scale=2.0, max_new_tokens=8, stop_on_eos=False)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    noise = [torch.randn(1, 4, 4), torch.randn(1, 4, 4)]
    out = pipe.sampler(config.replace(stop_token_ids=[])).image_to_text(images, noise=noise)
    ref = _uncached_caption_blocks(pipe, images, noise, config)
    assert out.num_blocks == 2
    for got, want in zip(out.block_latents, ref):
        assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- pipelines


def test_pipelines_round_trip_and_are_deterministic(tmp_path):
    pipe = tiny_multimodal_pipeline()
    pipe.generation_config = GenerationConfig(num_inference_steps=3, max_new_tokens=8)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    before = pipe("a red circle", generator=gen(0), output_type="np").images
    pipe.save_pretrained(tmp_path)
    t2i = ColaTextToImagePipeline.from_pretrained(tmp_path)
    i2t = ColaImageToTextPipeline.from_pretrained(tmp_path)
    for p in (t2i, i2t):
        p.set_progress_bar_config(disable=True)
    after = t2i("a red circle", generator=gen(0), output_type="np").images
    assert before.shape == (1, 16, 16, 3) and torch.allclose(
        torch.from_numpy(before), torch.from_numpy(after)
    )
    other = t2i("a red circle", generator=gen(1), output_type="np").images
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(other))
    assert t2i("a red circle", num_images_per_prompt=3, output_type="pt").images.shape == (3, 3, 16, 16)
    assert t2i("a red circle", output_type="latent").images.shape == (1, 2, 8, 8)
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    texts = [i2t(image, generator=gen(3)).texts for _ in range(2)]
    assert texts[0] == texts[1] and isinstance(texts[0][0], str)


def test_image_pipeline_resizes_and_converts_images():
    pipe = tiny_multimodal_pipeline()
    i2t = ColaImageToTextPipeline(**pipe.components, patch_size=2)
    i2t.set_progress_bar_config(disable=True)
    i2t.generation_config = GenerationConfig(num_inference_steps=2, max_new_tokens=4)
    rgb = Image.new("RGB", (16, 16), (30, 200, 30))
    for image in (
        Image.new("RGB", (40, 24), (30, 200, 30)),
        Image.new("RGBA", (16, 16)),
        Image.new("L", (16, 16)),
    ):
        assert len(i2t([image, rgb], generator=torch.Generator().manual_seed(0)).texts) == 2


def test_pipelines_refuse_bad_sizes_and_text_only_checkpoints(tmp_path):
    pipe = tiny_multimodal_pipeline()
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("a red circle", height=18, width=16)
    text_only = tiny_pipeline(["a red circle", "a blue square"])
    text_only.save_pretrained(tmp_path)
    for cls in (ColaTextToImagePipeline, ColaImageToTextPipeline):
        with pytest.raises(ValueError, match="without an image modality"):
            cls.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a prior with text and image streams"):
        ColaTextToImagePipeline(
            text_only.text_vae, pipe.image_vae, text_only.prior, pipe.scheduler, pipe.tokenizer
        )


def test_sampling_scripts_write_a_grid_and_captions(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import sample_i2t
    import sample_t2i

    pipe = tiny_multimodal_pipeline()
    pipe.generation_config = GenerationConfig(num_inference_steps=2, max_new_tokens=4)
    pipe.save_pretrained(tmp_path / "pipe")
    sample_t2i.main([str(tmp_path / "pipe"), "a red circle", "a blue square", "--images-per-prompt", "2",
                     "--output", str(tmp_path / "grid.png")])  # fmt: skip
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    Image.new("RGB", (24, 24), (30, 200, 30)).save(tmp_path / "img.png")
    sample_i2t.main([str(tmp_path / "pipe"), str(tmp_path / "img.png")])
    assert "img.png\n  -> " in capsys.readouterr().out


def test_text_to_image_refuses_a_prompt_longer_than_the_maximum():
    pipe = tiny_multimodal_pipeline()
    with pytest.raises(ValueError, match="more than the maximum 64"):
        pipe.sampler(GenerationConfig(num_inference_steps=1)).text_to_image([[5] * 65], 16, 16)


def test_text_to_image_per_prompt_generators():
    pipe = tiny_multimodal_pipeline()
    pipe.generation_config = GenerationConfig(num_inference_steps=2)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    both = pipe(["a red circle", "a blue square"], generator=[g(1), g(2)], output_type="pt").images
    alone = pipe(["a blue square"], generator=[g(2)], output_type="pt").images
    assert torch.allclose(both[1:], alone, atol=1e-5)
