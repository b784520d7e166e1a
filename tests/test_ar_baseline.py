"""The matched autoregressive baseline: model, pipeline, training run, CLI, loading, the size rule.

Tiny seeded models (fp32, CPU, seconds): the KV-cached generation equals an uncached recomputation,
a batch of prompts of different lengths equals each prompt alone, the pipeline round-trips through
save/load, ``unimodal train`` / ``sample`` / ``eval-samples`` take an AR run, and an AR folder where
a Cola pipeline is required (and the reverse) is one error line.
"""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturb, tiny_pipeline

from prior.checkpoints.released import load_ar_pipeline, load_cola_pipeline, load_pipeline
from prior.cli import main
from prior.models.ar import ARTransformer, count_parameters, matched_num_layers
from prior.models.mmdit import MMDiT
from prior.pipelines.pipeline_ar_text import ARTextPipeline
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.sampling.config import GenerationConfig
from prior.training.recipes import prior_kwargs
from prior.training.run_config import load_run_config
from unimodal.config import ConfigError
from unimodal.text_vae import TextVAE
from unimodal.tokenization import model_vocab_size, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "configs" / "text"
AR_YAML = str(TEXT / "ar_tiny.yaml")
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the value of the list is one."] * 4
PROMPTS = ["the cat sat", "", "a dog ran in the park and"]
TINY_AR = ["ar.width=32", "ar.heads=2", "ar.head_dim=16", "ar.rope_dim=8", "ar.num_layers=1"]
TINY_TRAIN = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=3", "train.eval_batches=1"]
TINY_TRAIN += ["train.log_every=1", "train.progress_bar=false", "train.tensorboard=false"]
TINY_DATA = ["data.max_documents=300", "data.seq_len=32"]


def tiny_ar_pipeline(num_layers: int = 2) -> ARTextPipeline:
    tokenizer = train_bpe_tokenizer(SENTENCES, vocab_size=300)
    torch.manual_seed(0)
    model = ARTransformer(
        vocab_size=model_vocab_size(tokenizer), width=32, heads=2, head_dim=16, rope_dim=8,
        num_layers=num_layers, max_seq_len=128,
    )  # fmt: skip
    perturb(model, 3, 0.05)  # logits far from uniform: greedy ties never decide a test
    pipe = ARTextPipeline(model.eval(), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- model and pipeline


def test_kv_cached_generation_equals_uncached_recomputation():
    """Prefill + one cached forward per token gives the logits of one uncached pass over the result."""
    model = tiny_ar_pipeline().transformer
    ids = torch.tensor([[0, 5, 17, 42, 9]])  # (1, P)
    cache = model.new_kv_cache()
    logits = [model(ids, kv_cache=cache, update_cache=True).logits[:, -1]]
    tokens = ids
    for _ in range(8):
        nxt = logits[-1].argmax(dim=-1, keepdim=True)  # (1, 1) greedy
        tokens = torch.cat((tokens, nxt), dim=1)
        logits.append(model(nxt, kv_cache=cache, update_cache=True).logits[:, -1])
    assert cache.seq_len == tokens.shape[1]
    full = model(tokens).logits[0, ids.shape[1] - 1 :]  # (9, V): no cache
    cached = torch.cat(logits)  # (9, V)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert torch.equal(full[:-1].argmax(dim=-1), tokens[0, ids.shape[1] :])
    # a read-only forward leaves the cache as it was
    model(nxt, kv_cache=cache)
    assert cache.seq_len == tokens.shape[1]


def test_pipeline_tokens_are_the_uncached_greedy_continuation():
    pipe = tiny_ar_pipeline()
    out = pipe(PROMPTS, max_new_tokens=7, stop_on_eos=False, output_type="ids")
    for prompt, new in zip(pipe.prompt_ids(PROMPTS), out.token_ids):
        assert len(new) == 7
        seq = torch.tensor([prompt + new])
        greedy = pipe.transformer(seq).logits[0, len(prompt) - 1 : -1].argmax(dim=-1)
        assert greedy.tolist() == new
    assert out.texts is None and out.num_model_calls == 7  # prefill + 6 cached steps


def test_batch_of_different_lengths_equals_each_prompt_alone():
    pipe = tiny_ar_pipeline()
    batched = pipe(PROMPTS, max_new_tokens=9, stop_on_eos=False)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe(prompt, max_new_tokens=9, stop_on_eos=False)
        assert alone.token_ids[0] == batched.token_ids[i] and alone.texts[0] == batched.texts[i]
    # the same at the logits: a left-padded row has its single-prompt logits
    model, rows = pipe.transformer, pipe.prompt_ids(PROMPTS)
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    valid = torch.zeros(len(rows), longest, dtype=torch.bool)
    positions = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :], valid[i, longest - len(r) :] = torch.tensor(r), True
        positions[i, longest - len(r) :] = torch.arange(len(r))
    padded = model(ids, positions, valid).logits
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r])).logits[0]
        torch.testing.assert_close(padded[i, longest - len(r) :], alone, atol=1e-5, rtol=0)


def test_output_is_cut_after_the_first_stop_id_and_at_max_new_tokens():
    pipe = tiny_ar_pipeline()
    free = pipe("the cat", max_new_tokens=10, stop_on_eos=False).token_ids[0]
    stop = free[3]
    cut = pipe("the cat", max_new_tokens=10, stop_token_ids=[stop]).token_ids[0]
    assert cut == free[: free.index(stop) + 1]
    assert pipe("the cat", max_new_tokens=2, stop_on_eos=False).token_ids[0] == free[:2]
    assert pipe.resolve_generation_config().stop_token_ids == [pipe.tokenizer.eos_token_id]


def test_stream_and_call_agree_and_sampling_follows_the_generator():
    pipe = tiny_ar_pipeline()
    settings = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2)
    call = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **settings)
    chunks = list(pipe.stream(PROMPTS, generator=torch.Generator().manual_seed(3), **settings))
    streamed = [sum((c.token_ids[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert streamed == call.token_ids
    assert ["".join(c.texts[i] for c in chunks) for i in range(len(PROMPTS))] == call.texts
    again = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **settings)
    assert again.token_ids == call.token_ids


def test_save_load_round_trip(tmp_path):
    pipe = tiny_ar_pipeline()
    pipe.generation_config = GenerationConfig(max_new_tokens=5, temperature=0.8, top_k=30)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    for loaded in (ARTextPipeline.from_pretrained(tmp_path), load_pipeline(tmp_path)):
        assert isinstance(loaded, ARTextPipeline)
        assert loaded.generation_config == pipe.generation_config
        loaded.set_progress_bar_config(disable=True)
        a = pipe(PROMPTS, generator=torch.Generator().manual_seed(0))
        b = loaded(PROMPTS, generator=torch.Generator().manual_seed(0))
        assert a.token_ids == b.token_ids and all(len(t) <= 5 for t in b.token_ids)
    assert load_ar_pipeline(tmp_path).tokenizer.eos_token_id == pipe.tokenizer.eos_token_id


def test_bad_calls_fail_with_one_clear_line():
    pipe = tiny_ar_pipeline()
    with pytest.raises(ValueError, match="output_type='latents'"):
        pipe("the cat", output_type="latents")
    with pytest.raises(ValueError, match="unknown generation setting 'steps'"):
        pipe("the cat", steps=3)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 128"):
        pipe.transformer(torch.zeros(1, 129, dtype=torch.long))


# ----------------------------------------------------------------------------- the wrong folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    tiny_ar_pipeline(num_layers=1).save_pretrained(root / "ar")
    tiny_pipeline(SENTENCES).save_pretrained(root / "cola")
    return root / "ar", root / "cola"


def test_an_ar_folder_where_a_cola_pipeline_is_required_is_one_line(folders, capsys):
    ar, cola = folders
    with pytest.raises(ValueError, match=r"holds an autoregressive baseline pipeline \(ARTextPipeline"):
        ColaTextPipeline.from_pretrained(ar)
    with pytest.raises(ValueError, match=rf"^{ar} holds an autoregressive .* but unimodal eval needs a Cola"):
        load_cola_pipeline(ar, "unimodal eval")
    assert main(["eval", str(ar), "--limit", "1"]) == 2
    line = _error_line(capsys)
    assert str(ar) in line and "ARTextPipeline" in line and "unimodal eval" in line
    assert isinstance(load_cola_pipeline(cola), ColaTextPipeline)


def test_a_cola_folder_where_an_ar_pipeline_is_required_is_one_line(folders):
    ar, cola = folders
    with pytest.raises(
        ValueError, match=r"holds a Cola DLM pipeline \(ColaTextPipeline\), but ARTextPipeline"
    ):
        ARTextPipeline.from_pretrained(cola)
    with pytest.raises(ValueError, match=rf"^{cola} holds a Cola DLM pipeline"):
        load_ar_pipeline(cola)


def test_study_context_and_lm_eval_refuse_an_ar_folder(folders):
    ar, _ = folders
    if importlib.util.find_spec("lm_eval") is not None:
        from prior.eval.lm_eval_adapter import ColaLM

        with pytest.raises(ValueError, match=r"but the lm-eval adapter \(ColaLM\) needs a Cola DLM"):
            ColaLM(pretrained=str(ar))
    if importlib.util.find_spec("matplotlib") is not None:
        spec = importlib.util.spec_from_file_location("study_context", ROOT / "scripts" / "study_context.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        with pytest.raises(ValueError, match="but scripts/study_context.py needs a Cola DLM"):
            module.main([str(ar)])


# ----------------------------------------------------------------------------- the size rule


def test_tiny_configs_obey_the_parameter_rule():
    """AR parameters = prior + Text VAE decoder (within 10%), at the prior's width/heads/head_dim."""
    vae, cola, ar = (
        load_run_config(TEXT / name) for name in ("vae_tiny.yaml", "cola_tiny.yaml", "ar_tiny.yaml")
    )
    vocab = vae.tokenizer.vocab_size
    with torch.device("meta"):
        decoder = TextVAE(**{**dataclasses.asdict(vae.vae), "vocab_size": vocab}).decoder
    n_decoder = sum(p.numel() for p in decoder.parameters())
    n_prior = count_parameters(MMDiT, **prior_kwargs(cola, vae.vae.latent_dim))
    ar_kwargs = {**dataclasses.asdict(ar.ar), "vocab_size": vocab}
    n_ar = count_parameters(ARTransformer, **ar_kwargs)
    assert abs(n_ar / (n_prior + n_decoder) - 1) < 0.10, (n_prior, n_decoder, n_ar)
    for name in ("width", "heads", "head_dim", "rope_dim", "mlp_ratio"):
        assert getattr(ar.ar, name) == getattr(cola.prior, name), name
    rest = {k: v for k, v in ar_kwargs.items() if k != "num_layers"}
    assert ar.ar.num_layers == matched_num_layers(n_prior + n_decoder, **rest)
    # the counts the config header states
    assert (round(n_prior / 1e4), round(n_decoder / 1e4), round(n_ar / 1e4)) == (507, 244, 762)


# ----------------------------------------------------------------------------- training and the CLI


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """A tiny Stage 1 (3 steps) and a 3-step AR run from its tokenizer, through ``unimodal train``."""
    root = tmp_path_factory.mktemp("runs")
    vae = [
        "train", str(TEXT / "vae_tiny.yaml"), f"train.output_dir={root / 'vae'}", *TINY_DATA,
        "tokenizer.vocab_size=300", "vae.dim=32", "vae.ffn_dim=64", "vae.num_heads=2",
        "vae.encoder_num_blocks=1", "vae.decoder_num_blocks=1", *TINY_TRAIN,
    ]  # fmt: skip
    assert main(vae) == 0
    ar = [
        "train", AR_YAML, f"stage1={root / 'vae'}", f"train.output_dir={root / 'ar'}", *TINY_DATA,
        *TINY_AR, *TINY_TRAIN,
    ]  # fmt: skip
    assert main(ar) == 0
    return root


def test_ar_training_run_writes_a_loadable_export(ar_run):
    export = ar_run / "ar" / "checkpoints" / "step_0000003" / "model"
    assert (export / "model_index.json").is_file() and (export / "generation_config.json").is_file()
    pipe = load_pipeline(ar_run / "ar")
    assert isinstance(pipe, ARTextPipeline) and pipe.generation_config.max_new_tokens == 48
    stage1_vocab = (ar_run / "vae" / "tokenizer" / "tokenizer.json").read_text()
    assert (export / "tokenizer" / "tokenizer.json").read_text() == stage1_vocab  # identical tokens
    assert pipe.transformer.config.vocab_size == model_vocab_size(pipe.tokenizer)


def test_sample_and_eval_samples_accept_an_ar_run(ar_run, capsys):
    run = str(ar_run / "ar")
    capsys.readouterr()
    assert main(["sample", run, "--prompt", "The value", "--prompt", "", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("The value\u2502") and len(lines) == 2
    assert main(["sample", run, "--prompt", "The value", "--max-new-tokens", "4", "--stream"]) == 0
    capsys.readouterr()
    assert main(["eval-samples", run, "--num-prompts", "2", "--show", "1", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    for row in ("generated continuations", "held-out real continuations", "unigram word salad"):
        assert row in out
    assert main(["eval", run, "--limit", "1"]) == 2
    assert run in _error_line(capsys)


def test_ar_run_config_errors(ar_run, capsys):
    with pytest.raises(ConfigError, match="vae: is unused by task: ar"):
        load_run_config(AR_YAML, ["vae.dim=32"])
    assert main(["train", AR_YAML, "stage1=null", f"train.output_dir={ar_run / 'x'}", *TINY_AR]) == 2
    assert "stage1" in _error_line(capsys)
    bad = [
        "train",
        AR_YAML,
        f"stage1={ar_run / 'vae'}",
        f"train.output_dir={ar_run / 'y'}",
        "ar.vocab_size=7",
    ]
    assert main(bad) == 2
    assert "ar.vocab_size=7 disagrees with the tokenizer" in _error_line(capsys)
    assert not (ar_run / "x").exists() and not (ar_run / "y").exists()


def test_quickstart_with_the_ar_baseline(tmp_path, capsys):
    """``unimodal quickstart --baseline ar`` at tiny sizes: Cola samples, then the AR baseline's."""
    data = [f"--{stage}={kv}" for stage in ("vae", "cola", "ar") for kv in TINY_DATA + TINY_TRAIN]
    vae = ["tokenizer.vocab_size=300", "vae.dim=32", "vae.ffn_dim=64", "vae.num_heads=2"]
    vae += ["vae.encoder_num_blocks=1", "vae.decoder_num_blocks=1"]
    prior = ["prior.width=32", "prior.heads=2", "prior.head_dim=16", "prior.rope_dim=8", "prior.num_layers=1"]
    args = ["quickstart", f"--output-dir={tmp_path}", "--baseline=ar", "--num-prompts=2", "--show=1"]
    args += ["--eval-batches=1", *data, *(f"--vae={kv}" for kv in vae), *(f"--cola={kv}" for kv in prior)]
    args += [
        *(f"--ar={kv}" for kv in TINY_AR),
        "--cola=generation.max_new_tokens=8",
        "--cola=generation.num_inference_steps=2",
    ]
    args += ["--ar=generation.max_new_tokens=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "== AR baseline samples ==" in out and out.count("generated continuations") == 2
    assert isinstance(load_pipeline(tmp_path / "ar"), ARTextPipeline)


def test_ar_tiny_mirrors_cola_tiny():
    """Same data, batch size, LR schedule, precision and time budget as the Cola run it is measured against."""
    cola, ar = load_run_config(TEXT / "cola_tiny.yaml"), load_run_config(AR_YAML)
    assert ar.data == cola.data and ar.stage1 == cola.stage1
    assert dataclasses.replace(ar.train, output_dir=cola.train.output_dir) == cola.train
    assert ar.generation.max_new_tokens == cola.generation.max_new_tokens
