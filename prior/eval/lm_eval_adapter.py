"""lm-evaluation-harness adapter: Cola DLM as the lm_eval model ``cola``.

    python -m prior.eval.lm_eval_adapter --model cola --model_args pretrained=PATH[,key=value...] --tasks T

``PATH`` is a pipeline folder, a Stage-2 run folder or a released checkpoint folder
(:func:`prior.checkpoints.released.load_pipeline`). lm_eval finds models in its registry only, so the module
that calls ``register_model`` must be imported before the harness runs: ``python -m
prior.eval.lm_eval_adapter ...`` does that and then hands over to lm_eval's own command line (every
lm_eval flag works, e.g. ``--include_path`` for local tasks); from Python, ``import
prior.eval.lm_eval_adapter`` and call ``lm_eval.simple_evaluate(model="cola", ...)``.

Batching
--------
``batch_size`` is an integer (contexts or scoring pairs per call) or ``"auto"``, as in lm-eval's
HFLM: the largest batch that fits, bounded by ``max_batch_size`` (default 64, HFLM's default).
``"auto"`` starts at ``max_batch_size``; a batch that runs out of memory (the out-of-memory errors
accelerate's ``find_executable_batch_size`` reacts to: CUDA/HIP/XPU/MPS, and the CPU allocator) is
retried at half the size, and the size that fit is kept for the rest of the run. No probe pass is
spent: the real batches are the probe, and since scoring requests run longest first, the first
batch is the hardest. With an integer ``batch_size``, ``max_batch_size`` caps it. The noise is
keyed per item, so results do not depend on the batch size. ``"auto:N"`` (HFLM's re-detection
schedule) is refused: the size already adapts at every batch.

Requests
--------
* ``generate_until`` runs the pipeline, batched (``batch_size`` contexts per call, grouped by
  their generation kwargs), with the released generation preset by default (``released=True``:
  :func:`prior.eval.generative.generation_config`; CFG 7, 16 steps, penalty 1.1, greedy) and the
  released per-sample noise (seed ``seed``, key ``crc32(context)``). ``max_gen_toks`` (request,
  else model arg) sets ``max_new_tokens``; the text is cut at the first ``until`` string (EOS and
  ``<|im_end|>`` as text are always stop strings, since the released decoding keeps special
  tokens). Whole blocks are generated, so the cut is applied to the text afterwards.
  ``temperature`` / ``do_sample`` / ``top_k`` / ``top_p`` in the request are honoured.
* ``loglikelihood`` is an **estimate**, not the exact marginal likelihood (a continuous latent
  model has no tractable ``log p(x)``). Two estimators (model arg ``loglikelihood``):

  - ``predictive`` (default): ``sum_k log (1/S) sum_s p(x_k | z_<k, z_k^(s))`` over the
    continuation's blocks ``k``: ``z_<k`` are the posterior-mean latents of the true text (context
    and earlier continuation blocks: teacher forcing), ``z_k^(s)`` are ``S = ll_samples`` latents
    the prior samples for block ``k`` given them (``ll_steps`` Euler steps, guidance
    ``ll_guidance_scale``, default 1 = no CFG), and ``p(x_k | ...)`` is the VAE decoder's
    probability of the block's continuation tokens. Since ``E log <= log E``, in expectation it
    is a lower bound of ``sum_k log p(x_k | x_<k)`` under the model's sampler (tighter with more
    samples). It depends on the context through the prior, so it ranks choices.
  - ``reconstruction``: the decoder's log-probability of the continuation tokens given the
    posterior-mean latents of context + continuation. This is the autoencoder's reconstruction
    term: the latents have seen the continuation, so it measures how well the VAE reconstructs,
    not how likely the continuation is; cheap, deterministic, mostly useful as a sanity check.

  ``is_greedy`` is whether the decoder's argmax equals every continuation token (first sample).
* ``loglikelihood_rolling``: the same estimate for the whole string with an empty context
  (unconditional first block), in disjoint windows of ``max_seq_len // 2`` tokens, each
  conditioned on up to ``max_seq_len // 2`` preceding tokens.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from prior.eval.generative import RELEASED_NOISE_SEED, generate_texts, generation_config, pipeline_device
from prior.pipelines.pipeline_cola_text import ColaTextPipeline
from prior.sampling.block_sampler import BlockSampler, StepState
from prior.sampling.config import GenerationConfig
from unimodal.tokenization import IM_END_TOKEN

LOGLIKELIHOOD_MODES = ("predictive", "reconstruction")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAMPLE_KEY_STRIDE = 1_000_003  # separates the noise streams of the samples of one request
DEFAULT_MAX_BATCH_SIZE = 64  # the bound of batch_size="auto" when max_batch_size is not given (HFLM's)
_OOM_MESSAGES = (  # the errors accelerate.utils.memory.should_reduce_batch_size treats as out of memory
    " out of memory.",
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
)


@dataclass
class ContinuationScore:
    """Estimated log-probability of a continuation, and whether greedy decoding reproduces it."""

    logprob: float
    is_greedy: bool


# ------------------------------------------------------------------------------------ helpers


def text_key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _pad_ids(
    rows: Sequence[Sequence[int]], multiple: int, pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to one length (a multiple of ``multiple``): ids (B, L), valid (B, L)."""
    length = max(1, max(len(r) for r in rows))
    length = math.ceil(length / multiple) * multiple
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long, device=device)
        valid[i, : len(r)] = True
    return ids, valid


def _gather_scores(logits: torch.Tensor, rows: list[int], positions: list[int], targets: list[int]):
    """log-softmax at (row, position) pairs -> (logprobs (n,), argmax hits (n,))."""
    picked = logits[torch.tensor(rows), torch.tensor(positions)].float()  # (n, V)
    logp = picked.log_softmax(dim=-1)
    target = torch.tensor(targets, device=logp.device)
    return logp.gather(1, target[:, None])[:, 0].cpu(), (picked.argmax(dim=-1) == target).cpu()


@torch.no_grad()
def reconstruction_logprobs(
    pipe: ColaTextPipeline, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> list[ContinuationScore]:
    """Decoder log p(continuation | posterior-mean latents of context + continuation) per pair."""
    vae = pipe.text_vae
    full = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    ids, valid = _pad_ids(full, vae.config.patch_size, pipe.tokenizer.pad_token_id, pipeline_device(pipe))
    encoded = vae.encode(ids, valid)
    logits = vae.decode(encoded.latents, encoded.valid).logits  # (B, L, V)
    rows, positions, targets = [], [], []
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        rows += [i] * len(x)
        positions += range(len(c), len(c) + len(x))
        targets += list(x)
    out = [ContinuationScore(0.0, True) for _ in full]
    if not targets:
        return out
    logp, hit = _gather_scores(logits, rows, positions, targets)
    for r, lp, h in zip(rows, logp.tolist(), hit.tolist()):
        out[r] = ContinuationScore(out[r].logprob + lp, out[r].is_greedy and h)
    return out


@torch.no_grad()
def predictive_logprobs(
    pipe: ColaTextPipeline,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    num_samples: int = 1,
    num_inference_steps: int = 16,
    guidance_scale: float = 1.0,
    seed: int = 0,
    keys: Sequence[int] | None = None,
) -> list[ContinuationScore]:
    """The teacher-forced predictive estimate of the module docstring, one value per pair.

    ``keys``: per-pair noise keys (default: the pair's index), so a pair's value does not depend
    on the batch it is in.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    vae, device = pipe.text_vae, pipeline_device(pipe)
    bs, p, steps = int(pipe.prior.config.block_size), int(vae.config.patch_size), num_inference_steps
    keys = list(range(len(contexts))) if keys is None else list(keys)
    rows = [(b, s) for b in range(len(contexts)) for s in range(num_samples)]  # row r -> (pair, sample)
    ctx = [list(contexts[b]) for b, _ in rows]
    cont = [list(continuations[b]) for b, _ in rows]
    prefix = [(len(c) // (bs * p)) * bs for c in ctx]  # whole prompt blocks, in latents
    needed = [math.ceil((len(c) + len(x)) / p) - pre for c, x, pre in zip(ctx, cont, prefix)]
    n_blocks = [math.ceil(n / bs) if x else 0 for n, x in zip(needed, cont)]
    if max(n_blocks) == 0:
        return [ContinuationScore(0.0, True) for _ in contexts]

    # true latents of context + continuation (the teacher), normalised posterior means
    ids, valid = _pad_ids([c + x for c, x in zip(ctx, cont)], p, pipe.tokenizer.pad_token_id, device)
    z_true = vae.encode(ids, valid).latents.float()  # (R, N, d)
    total = max(pre + n * bs for pre, n in zip(prefix, n_blocks))
    z_full = torch.zeros(len(rows), max(total, z_true.shape[1]), z_true.shape[2], device=device)
    z_full[:, : z_true.shape[1]] = z_true
    true_len = [math.ceil((len(c) + len(x)) / p) for c, x in zip(ctx, cont)]
    for r, n in enumerate(true_len):
        z_full[r, n:] = 0.0

    predicted: list[torch.Tensor] = []

    def teacher(state: StepState) -> torch.Tensor | None:
        if state.step != steps - 1:
            return None
        k = state.block
        predicted.append(state.latents.clone())  # (R, bs, d): the prior's sample of block k
        forced = state.latents.clone()
        for r, pre in enumerate(prefix):
            lo, hi = pre + k * bs, min(pre + (k + 1) * bs, true_len[r])
            if hi > lo:
                forced[r, : hi - lo] = z_full[r, lo:hi]
        return forced  # commit (and condition later blocks on) the true latents

    config = pipe.resolve_generation_config(
        GenerationConfig(), num_inference_steps=steps, guidance_scale=guidance_scale,
        max_new_tokens=max(len(x) for x in cont), stop_on_eos=False, whole_blocks=True,
        first_block="clean_repaint",
    )  # fmt: skip
    sampler = BlockSampler(pipe.text_modality, pipe.prior, pipe.scheduler, config)

    def noise(block: int, shape: tuple[int, ...]) -> torch.Tensor:
        out = []
        for b, s in rows:
            key = keys[b] + s * _SAMPLE_KEY_STRIDE
            gen = torch.Generator(device=device).manual_seed(seed + key * 1000 + (block + 1) * 10_000_000)
            out.append(torch.randn(shape[1:], generator=gen, device=device, dtype=torch.float32))
        return torch.stack(out)

    sampler.sample(ctx, noise=noise, step_callback=teacher)

    block_logp = torch.zeros(len(rows), max(n_blocks))  # (R, K) per-row per-block sums
    greedy = [True] * len(rows)
    for k in range(max(n_blocks)):
        live = [r for r in range(len(rows)) if k < n_blocks[r]]
        if not live:
            continue
        length = max(prefix[r] + (k + 1) * bs for r in live)
        z = z_full[:, :length].clone()
        latent_valid = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for r in range(len(rows)):
            end = min(prefix[r] + (k + 1) * bs, length)
            latent_valid[r, :end] = True
            if k < n_blocks[r]:
                z[r, prefix[r] + k * bs : prefix[r] + (k + 1) * bs] = predicted[k][r]
        logits = vae.decode(z.to(vae.dtype), latent_valid).logits  # (R, length * p, V)
        sel_rows, positions, targets = [], [], []
        for r in live:
            lo, hi = (prefix[r] + k * bs) * p, (prefix[r] + (k + 1) * bs) * p  # token span of block k
            for j, token in enumerate(cont[r]):
                pos = len(ctx[r]) + j
                if lo <= pos < hi:
                    sel_rows.append(r)
                    positions.append(pos)
                    targets.append(token)
        if not targets:
            continue
        logp, hit = _gather_scores(logits, sel_rows, positions, targets)
        for r, lp, h in zip(sel_rows, logp.tolist(), hit.tolist()):
            block_logp[r, k] += lp
            greedy[r] = greedy[r] and h
    out = []
    for b in range(len(contexts)):
        mine = [i for i, (pair, _) in enumerate(rows) if pair == b]
        per_block = torch.logsumexp(block_logp[mine], dim=0) - math.log(num_samples)  # (K,)
        out.append(ContinuationScore(float(per_block.sum()), greedy[mine[0]]))
    return out


def parse_batch_size(batch_size: int | str | None, max_batch_size: int | None) -> tuple[int, bool]:
    """``(starting batch size, auto)`` from lm_eval's ``batch_size`` / ``max_batch_size`` arguments."""
    if max_batch_size is not None and (
        isinstance(max_batch_size, bool) or not str(max_batch_size).isdigit() or int(max_batch_size) < 1
    ):
        raise ValueError(f"max_batch_size={max_batch_size!r}; expected an integer >= 1")
    bound = None if max_batch_size is None else int(max_batch_size)
    text = "8" if batch_size is None else str(batch_size).strip()
    if text.startswith("auto"):
        if text != "auto":
            raise ValueError(
                f"batch_size={batch_size!r}: only 'auto' is supported (the batch size already adapts at every batch)"
            )
        return bound or DEFAULT_MAX_BATCH_SIZE, True
    if isinstance(batch_size, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected an integer >= 1 or 'auto'")
    return min(int(text), bound or int(text)), False


def is_out_of_memory(error: BaseException) -> bool:
    """True for the out-of-memory errors a smaller batch can avoid."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any (non-empty) stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if 0 <= at < cut:
                cut = at
    return text[:cut]


# ---------------------------------------------------------------------------------------- model


class ColaLM(LM):
    """Cola DLM for lm-evaluation-harness (see the module docstring for what each request returns).

    Model args: ``pretrained`` (path, or a pipeline object), ``batch_size`` (8, or ``"auto"``),
    ``max_batch_size`` (the bound of ``"auto"``, default 64; caps an integer size), ``device``
    (cuda if available), ``dtype`` (float32 | bfloat16 | float16), ``released`` (True: the
    released generation preset), ``max_gen_toks`` (32), ``steps`` / ``guidance_scale`` /
    ``repetition_penalty`` / ``temperature`` (generation overrides), ``seed`` (66, the noise seed),
    ``loglikelihood`` (predictive | reconstruction), ``ll_samples`` (1), ``ll_steps`` (16),
    ``ll_guidance_scale`` (1.0).
    """

    def __init__(
        self,
        pretrained: str | ColaTextPipeline,
        batch_size: int | str | None = 8,
        device: str | None = None,
        dtype: str | None = None,
        released: bool = True,
        max_gen_toks: int = 32,
        steps: int | None = None,
        guidance_scale: float | None = None,
        repetition_penalty: float | None = None,
        temperature: float | None = None,
        seed: int = RELEASED_NOISE_SEED,
        loglikelihood: str = "predictive",
        ll_samples: int = 1,
        ll_steps: int = 16,
        ll_guidance_scale: float = 1.0,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.auto_batch_size = parse_batch_size(batch_size, max_batch_size)
        self.batch_sizes: dict[str, int] = {}  # with "auto": the size each request type ended at
        if loglikelihood not in LOGLIKELIHOOD_MODES:
            raise ValueError(f"loglikelihood={loglikelihood!r}; expected one of {LOGLIKELIHOOD_MODES}")
        if dtype not in (None, "auto", *DTYPES):
            raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
        if isinstance(pretrained, ColaTextPipeline):
            pipe = pretrained
        else:
            from prior.checkpoints.released import load_cola_pipeline

            pipe = load_cola_pipeline(str(pretrained), "the lm-eval adapter (ColaLM)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = pipe.to(device=device, dtype=DTYPES.get(dtype))
        self.pipe.set_progress_bar_config(disable=True)
        self._device = torch.device(device)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.generation = generation_config(
            released=bool(released), num_inference_steps=steps, guidance_scale=guidance_scale,
            repetition_penalty=repetition_penalty, temperature=temperature,
        )  # fmt: skip
        self.ll_mode, self.ll_samples = loglikelihood, int(ll_samples)
        self.ll_steps, self.ll_guidance_scale = int(ll_steps), float(ll_guidance_scale)
        tok = self.pipe.tokenizer
        self.stop_strings = [
            t for t in (tok.eos_token, IM_END_TOKEN if IM_END_TOKEN in tok.get_vocab() else None) if t
        ]

    @property
    def tokenizer_name(self) -> str:
        return str(self.pipe.tokenizer.name_or_path).replace("/", "__")

    # ------------------------------------------------------------------ tokenization

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids as the pipeline tokenizes prompts; continuation ids = the rest of the whole text."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # the word-boundary space belongs to the continuation (lm_eval convention)
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tok = self.pipe.tokenizer
        if not context:
            return [], tok(continuation, add_special_tokens=False)["input_ids"]
        ctx = tok(context)["input_ids"]
        plain = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        if whole[: len(plain)] == plain:
            return ctx, whole[len(plain) :]
        return ctx, tok(continuation, add_special_tokens=False)["input_ids"]

    def _score(self, pairs: list[tuple[list[int], list[int]]], keys: list[int]) -> list[ContinuationScore]:
        contexts, continuations = [p[0] for p in pairs], [p[1] for p in pairs]
        if self.ll_mode == "reconstruction":
            return reconstruction_logprobs(self.pipe, contexts, continuations)
        return predictive_logprobs(
            self.pipe, contexts, continuations, num_samples=self.ll_samples,
            num_inference_steps=self.ll_steps, guidance_scale=self.ll_guidance_scale, seed=self.seed,
            keys=keys,
        )  # fmt: skip

    def _in_batches(
        self, indices: Sequence[int], run: Callable[[list[int]], None], kind: str, bar=None
    ) -> None:
        """``run`` on consecutive chunks of ``indices`` of ``batch_size`` items; under ``"auto"`` a
        chunk that runs out of memory is retried at half the size, which is then kept."""
        start = 0
        while start < len(indices):
            batch = list(indices[start : start + self.batch_size])
            try:
                run(batch)
            except Exception as error:
                if not (self.auto_batch_size and self.batch_size > 1 and is_out_of_memory(error)):
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                _free_memory()
                continue
            start += len(batch)
            if bar is not None:
                bar.update(len(batch))
        if self.auto_batch_size and indices:
            self.batch_sizes[kind] = self.batch_size

    def _score_batched(self, pairs, keys, desc: str) -> list[ContinuationScore]:
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[ContinuationScore | None] = [None] * len(pairs)

        def run(idx: list[int]) -> None:
            for i, score in zip(idx, self._score([pairs[i] for i in idx], [keys[i] for i in idx])):
                out[i] = score

        with tqdm(total=len(order), desc=desc, disable=len(order) <= self.batch_size) as bar:
            self._in_batches(order, run, "loglikelihood", bar)
        return out

    # ------------------------------------------------------------------ lm_eval requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        pairs = [self._encode_pair(context, continuation) for context, continuation in args]
        keys = [text_key(c + "\x00" + x) for c, x in args]
        scores = self._score_batched(pairs, keys, "cola loglikelihood")
        results = []
        for a, s in zip(args, scores):
            results.append((s.logprob, s.is_greedy))
            self.cache_hook.add_partial("loglikelihood", a, (s.logprob, s.is_greedy))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        window = max(self.pipe.text_vae.config.max_seq_len // 2, 1)
        results = []
        for req in requests:
            (text,) = req.args[:1]
            tokens = self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"]
            pairs = [
                (tokens[max(0, start - window) : start], tokens[start : start + window])
                for start in range(0, len(tokens), window)
            ]
            keys = [text_key(f"{text}\x00{i}") for i in range(len(pairs))]
            total = sum(s.logprob for s in self._score_batched(pairs, keys, "cola rolling")) if pairs else 0.0
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    def _request_settings(self, gen_kwargs: dict) -> tuple[list[str], dict]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        call = dict(max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)))
        do_sample = kwargs.pop("do_sample", None)
        if "temperature" in kwargs:
            call["temperature"] = float(kwargs.pop("temperature"))
        if do_sample is False:
            call["temperature"] = 0.0
        for name in ("top_k", "top_p"):
            if name in kwargs:
                call[name] = kwargs.pop(name)
        if kwargs:
            raise ValueError(f"unsupported generation kwarg {sorted(kwargs)[0]!r} for the cola model")
        return until + self.stop_strings, self.generation.replace(**call)

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="cola generate_until", disable=len(requests) <= self.batch_size)
        for indices in groups.values():
            until, config = self._request_settings(requests[indices[0]].args[1])

            def run(batch: list[int], until=until, config=config) -> None:
                contexts = [requests[i].args[0] for i in batch]
                keys = [text_key(c) for c in contexts]
                texts = generate_texts(
                    self.pipe, contexts, keys=keys, noise_seed=self.seed, generation_config=config
                )
                for i, text in zip(batch, texts):
                    results[i] = cut_at_stop_strings(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])

            self._in_batches(indices, run, "generate_until", bar)
        bar.close()
        return results


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the ``cola`` model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


__all__ = [
    "LOGLIKELIHOOD_MODES",
    "ColaLM",
    "ContinuationScore",
    "cut_at_stop_strings",
    "is_out_of_memory",
    "main",
    "parse_batch_size",
    "predictive_logprobs",
    "reconstruction_logprobs",
    "text_key",
]

if __name__ == "__main__":  # `python -m prior.eval.lm_eval_adapter`: register from the importable module
    from prior.eval.lm_eval_adapter import main as _main

    _main()
else:
    register_model("cola")(ColaLM)
