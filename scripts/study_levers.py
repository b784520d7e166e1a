"""The levers of the toy-scale prior, one config flag each, measured in one table at equal wall clock.

Every Stage-2 variant trains for the same ``--minutes`` on top of a Stage-1 run (``--vae-minutes``
each) and is scored the same way: held-out sample figures (``unimodal eval-samples``: in-vocabulary
words, distinct-2, bigram log-prob, context sensitivity under shared noise; ``--num-prompts``
prompts x ``--seeds``), the held-out flow loss over its Gaussian baseline at t = 0.5 / 0.7 / 0.9
with and without the clean history, and the token-level probe: the VAE decoder's accuracy on the
prior's clean estimate ``z_t - t v`` at those t, with and without history
(:func:`_study.clean_estimate_accuracy`). Stage-1 runs get a linear token probe
(:func:`prior.eval.vae.token_probe`): how well a latent names its own token and the one before it.

The rows (``VARIANTS``): the default recipe (categorical head, token-local VAE, block 4; two
training seeds, so the run-to-run spread is visible), (a) hygiene: EMA off, warmdown schedule;
(b) prior block size 16 and 1; (c) the auxiliary decoder loss; (d) self-conditioning; (e) no
context-free rows; (g) the paper recipe, ``fixed_vae`` vs ``joint``; (h) latent geometry: latent
dim 8 / 4, KL weight x100, a decoder without history (``vae.decoder_window=1``, on the contextual
VAE of the paper recipe); (i) block sizes mixed during training; (j) token-embedding history; and
sampler-side settings on the trained default (f): noise scale, latents projected onto the
encoder's output sphere, guidance only at high or low t. (k) off is the paper-recipe rows; the CFG
weight, the categorical head at block 16 and Muon are measured at 9.5 minutes in README "Quality
at toy scale".

Two processes can share the machine (``--part 0/2`` and ``--part 1/2``, one thread each, so every
run sees the same conditions); Stage 1 runs first in each part that needs it (``--stage1-only``
to train them all before), and ``--report`` gathers every finished variant into the study files.

    python scripts/study_levers.py --stage1-only
    OMP_NUM_THREADS=1 python scripts/study_levers.py --part 0/2 &
    OMP_NUM_THREADS=1 python scripts/study_levers.py --part 1/2; wait
    python scripts/study_levers.py --only default --sampler   # sampler-side rows (f), then the report
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _study import (
    CONFIGS,
    add_common_args,
    clean_estimate_accuracy,
    common_settings,
    plt,
    pm,
    relative_flow_loss,
    sample_figures,
    train_variant,
    write_study,
)

from prior.checkpoints.run_folders import list_checkpoints, resolve_export
from prior.eval.vae import token_probe
from prior.training.run_config import load_run_config
from unimodal.text_data import build_text_datasets
from unimodal.text_vae import TextVAE
from unimodal.tokenization import load_tokenizer

STAGE1 = {  # name -> vae_tiny.yaml overrides
    "vae_d16": ["vae.encoder_context=token"],
    "vae_d8": ["vae.encoder_context=token", "vae.latent_dim=8"],
    "vae_d4": ["vae.encoder_context=token", "vae.latent_dim=4"],
    "vae_kl": ["vae.encoder_context=token", "vae.kl_weight=0.01"],
    "vae_ctx": [],  # the paper's contextual Stage 1
    "vae_ctx_w1": ["vae.decoder_window=1"],  # ... with a decoder that sees no history
}
# the categorical recipe as it stood when the table was measured (block 4); block 1 (the `block_1` row)
# won and is now the quickstart default (prior.cli.QUICKSTART_RECIPES)
RECIPE = ["prior.prediction=categorical", "prior.block_size=4", "generation.noise_scale=0.5"]
VARIANTS = [  # key, lever, label, Stage-1 run, cola_tiny.yaml overrides
    ("default", "", "default recipe (categorical, token-local VAE, block 4)", "vae_d16", RECIPE),
    ("default_seed1", "", "default recipe, training seed 1", "vae_d16", [*RECIPE, "train.seed=1"]),
    ("ema_off", "a", "EMA off (raw weights)", "vae_d16", [*RECIPE, "train.ema_decay=null"]),
    ("warmdown", "a", "warmdown schedule (released) instead of cosine", "vae_d16",
     [*RECIPE, "train.lr_schedule=warmdown"]),
    ("block_16", "b", "prior block size 16 (the paper's)", "vae_d16", [*RECIPE, "prior.block_size=16"]),
    ("block_1", "b", "prior block size 1", "vae_d16", [*RECIPE, "prior.block_size=1"]),
    ("aux_decoder", "c", "auxiliary decoder CE on the clean estimate (weight 0.3)", "vae_d16",
     [*RECIPE, "joint.aux_decoder_weight=0.3"]),
    ("self_cond", "d", "self-conditioning", "vae_d16", [*RECIPE, "prior.self_condition=true"]),
    ("p_uncond_0", "e", "no context-free rows (p_uncond 0; default 0.1)", "vae_d16", [*RECIPE, "flow.p_uncond=0"]),
    ("mixed_blocks", "i", "block sizes 1/4/16 mixed in training (p 0.2/0.6/0.2)", "vae_d16",
     [*RECIPE, "flow.block_sizes=[1,4,16]", "flow.block_size_probs=[0.2,0.6,0.2]"]),
    ("token_history", "j", "history read as learned token embeddings", "vae_d16",
     [*RECIPE, "prior.history=tokens"]),
    ("latent_d8", "h", "latent dim 8", "vae_d8", RECIPE),
    ("latent_d4", "h", "latent dim 4", "vae_d4", RECIPE),
    ("kl_x100", "h", "Stage-1 KL weight 0.01 (x100)", "vae_kl", RECIPE),
    ("paper_fixed", "g", "paper recipe (velocity, contextual VAE, block 16), fixed_vae", "vae_ctx", []),
    ("paper_joint", "g", "paper recipe, joint (Joint DiT x1)", "vae_ctx", ["joint.mode=joint"]),
    ("paper_no_dec_history", "h", "paper recipe, decoder without history (window 1)", "vae_ctx_w1", []),
]  # fmt: skip
SAMPLER = [  # key, lever, label, generation overrides: sampled from the `default` run (no training)
    ("noise_1", "f", "default, noise scale 1.0 (the recipe's: 0.5)", {"noise_scale": 1.0}),
    ("project", "f", "default, each block projected onto the encoder's output sphere", {"project_latents": True}),
    ("cfg_high_t", "f", "default, guidance only at t in [0.5, 1]", {"guidance_interval": [0.5, 1.0]}),
    ("cfg_low_t", "f", "default, guidance only at t in [0, 0.5]", {"guidance_interval": [0.0, 0.5]}),
]  # fmt: skip
T_PROBE = (0.5, 0.7, 0.9)


def stage1(out: Path, name: str, minutes: float, smoke: bool) -> Path:
    run = out / name
    train_variant(CONFIGS / "vae_tiny.yaml", run, [f"train.max_time_minutes={minutes}", *STAGE1[name]], smoke)
    probe_file = run / "probe.json"
    if not probe_file.exists():
        export = resolve_export(run, "text_vae")
        vae = TextVAE.from_pretrained(export / "text_vae")
        cfg = load_run_config(run / "config.yaml")
        train_ds, val_ds = build_text_datasets(cfg.data, load_tokenizer(export / "tokenizer"))
        rows = lambda ds, n: torch.stack([ds[i]["input_ids"] for i in range(min(n, len(ds)))])  # noqa: E731
        probe = token_probe(vae, rows(train_ds, 512), rows(val_ds, 64))
        probe_file.write_text(json.dumps({"own": probe.accuracy[0], "previous": probe.accuracy[-1],
                                          "majority": probe.majority}, indent=2) + "\n")  # fmt: skip
    return run


def run_variant(args, key: str, stage1_name: str, overrides: list[str]) -> None:
    out = Path(args.output_dir)
    run = out / key
    if (run / "levers.json").exists():
        return
    s1 = stage1(out, stage1_name, args.vae_minutes, args.smoke)
    cfg, seconds = train_variant(
        CONFIGS / "cola_tiny.yaml", run,
        [f"stage1={s1}", f"train.max_time_minutes={args.minutes}", *overrides], args.smoke,
    )  # fmt: skip
    start = time.perf_counter()
    rows = 4 if args.smoke else 32
    result = {
        "steps": int("".join(c for c in list_checkpoints(run)[-1].name if c.isdigit())),
        "train_seconds": seconds,
        "samples": sample_figures(run, cfg, args.num_prompts, args.seeds),
        "flow": relative_flow_loss(run, cfg, rows=rows, t_values=T_PROBE),
        "probe": clean_estimate_accuracy(run, cfg, rows=rows, t_values=T_PROBE),
        "stage1_probe": json.loads((s1 / "probe.json").read_text()),
    }
    result["eval_seconds"] = time.perf_counter() - start
    (run / "levers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{key}: {result['steps']} steps, in-vocab {result['samples']['in_vocab']:.3f}", flush=True)


def run_sampler_variant(args, key: str, generation: dict) -> None:
    """A sampler setting on the trained `default` run: new sample figures, the prior's probes as they are."""
    out = Path(args.output_dir)
    if (out / key / "levers.json").exists():
        return
    base = json.loads((out / "default" / "levers.json").read_text())
    cfg = load_run_config(out / "default" / "config.yaml")
    samples = sample_figures(out / "default", cfg, args.num_prompts, args.seeds, **generation)
    (out / key).mkdir(parents=True, exist_ok=True)
    result = {**base, "samples": samples, "generation": generation, "train_seconds": 0.0}
    (out / key / "levers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{key}: in-vocab {samples['in_vocab']:.3f}", flush=True)


def report(args) -> None:
    out = Path(args.output_dir)
    rows_in_order = [*VARIANTS[:2], *((k, lv, lb, None, None) for k, lv, lb, _ in SAMPLER), *VARIANTS[2:]]
    done = [(v, json.loads((out / v[0] / "levers.json").read_text()))
            for v in rows_in_order if (out / v[0] / "levers.json").exists()]  # fmt: skip
    if not done:
        raise SystemExit(f"no finished variant under {out}")
    headers = ["lever", "variant", "steps", "in-vocab", "distinct-2", "bigram lp", "ctx sens.",
               "flow/base t .5/.7/.9 (ctx)", "(alone)", "probe acc t .5/.7/.9 (ctx)", "(alone)",
               "VAE probe own/prev"]  # fmt: skip
    rows = []
    for (_, lever, label, _, _), r in done:
        s, f, p, v = r["samples"], r["flow"], r["probe"], r["stage1_probe"]
        triple = lambda d: " / ".join(f"{d[str(t)]:.3f}" for t in T_PROBE)  # noqa: E731
        rows.append([
            lever or "-", label, r["steps"], pm(s["in_vocab"], s["in_vocab_spread"]), s["distinct2"],
            s["bigram_logprob"], s["context_sensitivity"], triple(f["with_context_by_t"]),
            triple(f["no_context_by_t"]), triple(p["with_context"]), triple(p["no_context"]),
            f"{v['own']:.3f} / {v['previous']:.3f}",
        ])  # fmt: skip
    anchor = done[0][1]["samples"]
    rows.append(["", "held-out real text", "", f"{anchor['real_in_vocab']:.3f}", anchor["real_distinct2"],
                 anchor["real_bigram_logprob"], "", "", "", "", "", ""])  # fmt: skip
    rows.append(["", "unigram word salad", "", f"{anchor['unigram_in_vocab']:.3f}",
                 anchor["unigram_distinct2"], anchor["unigram_bigram_logprob"], "", "", "", "", "", ""])  # fmt: skip
    base = [r for (v, r) in done if v[0] in ("default", "default_seed1")]
    spread = ""
    if len(base) == 2:
        iv = [b["samples"]["in_vocab"] for b in base]
        spread = (
            f"the two training seeds of the default differ by {abs(iv[0] - iv[1]):.3f} in-vocabulary words"
        )
    (_, _, best_label, *_), best = max(done, key=lambda d: d[1]["samples"]["in_vocab"])
    verdict = (
        f"{len(done)} variants at {args.minutes} minutes each (one thread, two runs side by side); {spread}; "
        f"the most in-vocabulary words: **{best_label}** ({best['samples']['in_vocab']:.3f}, bigram "
        f"{best['samples']['bigram_logprob']:.2f})"
    )

    def plot():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (key, *_), r in done:
            s = r["samples"]
            ax.errorbar(s["bigram_logprob"], s["in_vocab"], yerr=s["in_vocab_spread"], fmt="o")
            ax.annotate(key, (s["bigram_logprob"], s["in_vocab"]), fontsize=7)
        ax.scatter([anchor["real_bigram_logprob"]], [anchor["real_in_vocab"]], marker="*", s=120, c="k")
        ax.annotate("real text", (anchor["real_bigram_logprob"], anchor["real_in_vocab"]), fontsize=8)
        ax.set_xlabel("bigram log-prob / token")
        ax.set_ylabel("in-vocabulary words")
        ax.set_title(f"levers at {args.minutes} min each")
        return fig

    write_study(
        out, "Levers of the toy-scale prior at equal wall clock",
        "Joint DiT x1 is best among the Stage-2 modes; the rest are this project's levers (training hygiene, self-conditioning, mixed block sizes, token-embedding history, latent geometry, sampler settings) on the toy-scale recipe",
        verdict, headers, rows, {"variants": {v[0]: r for v, r in done}, "minutes": args.minutes},
        {"levers.png": plot},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "runs/studies/levers")
    p.add_argument("--minutes", type=float, default=6.0, help="Stage-2 budget of every variant")
    p.add_argument("--vae-minutes", type=float, default=3.0, help="budget of every Stage-1 run")
    p.add_argument("--part", default="0/1", help="i/n: run every n-th variant from the i-th")
    p.add_argument("--only", nargs="+", default=None, help="variant keys to run (default: all)")
    p.add_argument("--stage1-only", action="store_true", help="train (and probe) the Stage-1 runs, then stop")
    p.add_argument("--report", action="store_true", help="only gather finished variants into the study files")
    p.add_argument(
        "--sampler", action="store_true", help="also the sampler-side rows, from the `default` run"
    )
    args = common_settings(p.parse_args(argv))
    if args.smoke:
        args.minutes = args.vae_minutes = "null"  # the smoke overrides budget by steps
    if args.report:
        return report(args)
    out = Path(args.output_dir)
    if args.stage1_only:
        for name in STAGE1:
            stage1(out, name, args.vae_minutes, args.smoke)
        return
    i, n = (int(x) for x in args.part.split("/"))
    chosen = [v for v in VARIANTS if args.only is None or v[0] in args.only]
    for key, _, _, s1, overrides in chosen[i::n]:
        run_variant(args, key, s1, overrides)
    if args.sampler:
        for key, _, _, generation in SAMPLER:
            run_sampler_variant(args, key, generation)
    if n == 1:
        report(args)


if __name__ == "__main__":
    main()
