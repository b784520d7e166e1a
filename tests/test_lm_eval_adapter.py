"""The lm-evaluation-harness adapter: the real harness runs ``--model cola`` on local tasks, offline.

The tasks (``tests/data/lm_eval_tasks``: generate_until, multiple_choice, loglikelihood_rolling)
read a tiny jsonl next to their yaml; the model is a tiny random pipeline saved to a folder.
"""

import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from helpers import tiny_pipeline as build_tiny_pipeline  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from prior.eval.lm_eval_adapter import (  # noqa: E402
    DEFAULT_MAX_BATCH_SIZE,
    ColaLM,
    cut_at_stop_strings,
    is_out_of_memory,
    parse_batch_size,
    predictive_logprobs,
    reconstruction_logprobs,
)
from prior.pipelines.pipeline_cola_text import ColaTextPipeline  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
SENTENCES = [
    "The cat sat on the mat. The dog slept in the sun.",
    "A dog ran in the park and the cat slept.",
    "Latent diffusion writes text one block at a time.",
    "The prior moves noise to clean latents, the decoder reads them.",
] * 3


def tiny_pipeline() -> ColaTextPipeline:
    return build_tiny_pipeline(SENTENCES, max_seq_len=256)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cola_pipe")
    tiny_pipeline().save_pretrained(path)
    return path


def test_lm_eval_runs_cola_on_local_tasks(pipe_dir):
    results = lm_eval.simple_evaluate(
        model="cola",
        model_args=f"pretrained={pipe_dir},batch_size=3,steps=2,ll_steps=2,max_gen_toks=8,device=cpu",
        tasks=["cola_tiny_gen", "cola_tiny_mc", "cola_tiny_ppl"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    metrics = results["results"]
    assert 0.0 <= metrics["cola_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= metrics["cola_tiny_mc"]["acc,none"] <= 1.0
    assert math.isfinite(metrics["cola_tiny_ppl"]["word_perplexity,none"])
    assert metrics["cola_tiny_ppl"]["word_perplexity,none"] > 1.0
    gens = [s["resps"][0][0] for s in results["samples"]["cola_tiny_gen"]]
    assert len(gens) == 4 and all(isinstance(g, str) and "\n" not in g and "." not in g for g in gens)
    mc = results["samples"]["cola_tiny_mc"]
    assert all(len(s["resps"]) == 3 for s in mc)  # one loglikelihood per choice
    assert all(math.isfinite(r[0][0]) and r[0][0] < 0 for s in mc for r in s["resps"])


def make_requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]


def test_loglikelihood_estimates_are_deterministic_and_batch_independent():
    pipe = tiny_pipeline()
    lm = ColaLM(pipe, batch_size=2, device="cpu", ll_steps=2)
    pairs = [
        ("The cat sat on the", " mat"),
        ("A dog ran in the park", " and the cat slept."),
        ("", "The dog"),
    ]
    batched = lm.loglikelihood(make_requests("loglikelihood", pairs))
    alone = [lm.loglikelihood(make_requests("loglikelihood", [p]))[0] for p in pairs]
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb and a < 0
    assert batched == lm.loglikelihood(make_requests("loglikelihood", pairs))
    # more samples: a log-mean-exp over the same first sample and others
    two = ColaLM(pipe, batch_size=2, device="cpu", ll_steps=2, ll_samples=2).loglikelihood(
        make_requests("loglikelihood", pairs[:1])
    )[0][0]
    assert math.isfinite(two) and two < 0


def test_reconstruction_mode_matches_a_direct_decoder_computation():
    pipe = tiny_pipeline()
    tok = pipe.tokenizer
    ctx, cont = tok("The cat sat on")["input_ids"], tok(" the mat.", add_special_tokens=False)["input_ids"]
    (score,) = reconstruction_logprobs(pipe, [ctx], [cont])
    ids = torch.tensor([ctx + cont])
    logp = pipe.text_vae.decode(pipe.text_vae.encode(ids).latents).logits.float().log_softmax(-1)[0]
    expected = sum(logp[len(ctx) + j, t].item() for j, t in enumerate(cont))
    assert score.logprob == pytest.approx(expected, abs=1e-4)
    lm = ColaLM(pipe, device="cpu", loglikelihood="reconstruction")
    ((value, _),) = lm.loglikelihood(make_requests("loglikelihood", [("The cat sat on", " the mat.")]))
    assert value == pytest.approx(expected, abs=1e-4)


def test_predictive_estimate_sees_the_context():
    pipe = tiny_pipeline()
    tok = pipe.tokenizer
    cont = tok(" the mat.", add_special_tokens=False)["input_ids"]
    contexts = [tok("The cat sat on")["input_ids"], tok("Latent diffusion writes")["input_ids"]]
    scores = predictive_logprobs(pipe, contexts, [cont, cont], num_inference_steps=2, keys=[7, 7])
    assert scores[0].logprob != pytest.approx(scores[1].logprob)
    assert all(math.isfinite(s.logprob) and s.logprob < 0 for s in scores)


def test_generate_until_cuts_at_stop_strings_and_bad_args_fail():
    assert cut_at_stop_strings("a b. c\nd", ["\n", "."]) == "a b"
    assert cut_at_stop_strings("abc", ["", "x"]) == "abc"
    pipe = tiny_pipeline()
    lm = ColaLM(pipe, batch_size=2, device="cpu", steps=2)
    reqs = make_requests(
        "generate_until",
        [
            ("The cat sat", {"until": ["e"], "max_gen_toks": 4}),
            ("A dog", {"until": ["\n"], "max_gen_toks": 4}),
        ],
    )
    out = lm.generate_until(reqs)
    assert len(out) == 2 and "e" not in out[0] and all(isinstance(t, str) for t in out)
    with pytest.raises(ValueError, match="unsupported generation kwarg 'num_beams'"):
        lm.generate_until(make_requests("generate_until", [("x", {"num_beams": 2})]))
    with pytest.raises(ValueError, match="loglikelihood='exact'"):
        ColaLM(pipe, device="cpu", loglikelihood="exact")


def test_batch_size_auto_and_max_batch_size_are_parsed_or_refused():
    assert parse_batch_size("auto", None) == (DEFAULT_MAX_BATCH_SIZE, True) == (64, True)
    assert parse_batch_size("auto", 4) == (4, True)
    assert (
        parse_batch_size(8, None) == parse_batch_size("8", None) == parse_batch_size(None, None) == (8, False)
    )
    assert parse_batch_size(8, 3) == (3, False)  # max_batch_size caps an integer size
    assert parse_batch_size(2, 3) == (2, False)
    with pytest.raises(ValueError, match="only 'auto' is supported"):
        parse_batch_size("auto:4", None)
    for bad in (0, "0", "big", -1, True):
        with pytest.raises(ValueError, match="expected an integer >= 1 or 'auto'"):
            parse_batch_size(bad, None)
    for bad in (0, "many", True):
        with pytest.raises(ValueError, match="max_batch_size=.*expected an integer >= 1"):
            parse_batch_size("auto", bad)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ..."))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("x"))


def _fits_at_most(lm: ColaLM, limit: int, seen: list[int]):
    """Wrap lm._score so that a batch above ``limit`` pairs runs out of memory."""
    score = lm._score

    def run(pairs, keys):
        seen.append(len(pairs))
        if len(pairs) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return score(pairs, keys)

    lm._score = run


def test_batch_size_auto_finds_the_largest_batch_that_fits_under_max_batch_size():
    pipe = tiny_pipeline()
    pairs = [("The cat sat on the", " mat"), ("A dog ran", " in the park"), ("", "The dog"), ("The", " cat")]
    pairs += [("Latent diffusion", " writes text"), ("The prior", " moves noise")]
    reference = ColaLM(pipe, batch_size=6, device="cpu", ll_steps=2).loglikelihood(
        make_requests("loglikelihood", pairs)
    )
    lm = ColaLM(pipe, batch_size="auto", max_batch_size=5, device="cpu", ll_steps=2)
    assert (lm.batch_size, lm.auto_batch_size) == (5, True)
    seen: list[int] = []
    _fits_at_most(lm, 2, seen)
    out = lm.loglikelihood(make_requests("loglikelihood", pairs))
    assert seen == [5, 2, 2, 2]  # 5 fails, halves to 2 (retried), which is kept for the rest
    assert lm.batch_size == 2 and lm.batch_sizes == {"loglikelihood": 2}
    for (a, ga), (b, gb) in zip(out, reference):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # an integer batch size does not adapt: running out of memory is the caller's error
    fixed = ColaLM(pipe, batch_size=4, device="cpu", ll_steps=2)
    _fits_at_most(fixed, 2, [])
    with pytest.raises(torch.OutOfMemoryError):
        fixed.loglikelihood(make_requests("loglikelihood", pairs))
    # max_batch_size caps an integer size
    assert ColaLM(pipe, batch_size=16, max_batch_size=3, device="cpu").batch_size == 3


def test_lm_eval_passes_batch_size_auto_and_max_batch_size(pipe_dir):
    lm = ColaLM.create_from_arg_string(
        f"pretrained={pipe_dir},device=cpu,steps=2", {"batch_size": "auto", "max_batch_size": 3}
    )
    assert (lm.batch_size, lm.auto_batch_size) == (3, True)
    out = lm.generate_until(make_requests("generate_until", [("The cat", {"max_gen_toks": 4})] * 4))
    assert len(out) == 4 and lm.batch_sizes == {"generate_until": 3}
    with pytest.raises(ValueError, match="only 'auto' is supported"):
        ColaLM.create_from_arg_string(f"pretrained={pipe_dir},device=cpu", {"batch_size": "auto:2"})
