#!/usr/bin/env bash
# Every study of docs/findings.md at its stated budget, one after the other, then docs/findings.md.
# Needs the Stage-1/Stage-2 runs of `unimodal quickstart --recipe paper` (runs/q_def/...) and of the
# default recipe (runs/q_run2/vae: a token-local VAE); set VAE / COLA / CAT_VAE to use others.
#   bash scripts/run_studies.sh            # ~3.5 h on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
VAE=${VAE:-runs/q_def/vae} COLA=${COLA:-runs/q_def/cola} CAT_VAE=${CAT_VAE:-runs/q_run2/vae} OUT=${OUT:-runs/studies}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
run() {  # name, script args...: the log keeps the wall clock and CPU time (make_findings reads it)
  local name=$1; shift
  echo "== $name $(date +%T)"
  /usr/bin/time -f "$name: %e s wall, %U s user" python "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1
  tail -1 "$OUT/$name.log"
}
run cola_ar_mdm scripts/study_cola_ar_mdm.py --vae "$VAE" --categorical-vae "$CAT_VAE" --minutes 4
run first_block scripts/study_first_block.py "$COLA"
run steps_cfg scripts/study_steps_cfg.py "$COLA"
run block_size scripts/study_block_size.py --vae "$VAE" --steps 300
run stage2_modes scripts/study_stage2_modes.py --vae-steps 200 --steps 150
run patch_parity scripts/study_patch_parity.py --vae-steps 250 --steps 300
run loc_dim scripts/study_loc_dim.py --vae-steps 200 --steps 150 --seeds 0
run vae_robustness scripts/study_vae_robustness.py "$VAE" "$OUT/stage2_modes/vae_no_BERT_loss" \
  "$OUT/stage2_modes/vae_fixed_logSNR" "$OUT/patch_parity/vae_p2" "$CAT_VAE"
# the levers of the default recipe: two one-thread processes side by side (every run sees the same
# load), then the sampler-side rows on the trained default, then the levers section of the page
OMP_NUM_THREADS=1 python scripts/study_levers.py --output-dir "$OUT/levers" --stage1-only > "$OUT/levers.stage1.log" 2>&1
OMP_NUM_THREADS=1 python scripts/study_levers.py --output-dir "$OUT/levers" --part 0/2 > "$OUT/levers.part0.log" 2>&1 &
OMP_NUM_THREADS=1 python scripts/study_levers.py --output-dir "$OUT/levers" --part 1/2 > "$OUT/levers.part1.log" 2>&1
wait
python scripts/study_levers.py --output-dir "$OUT/levers" --only default --sampler > "$OUT/levers.log" 2>&1
python scripts/make_findings.py --studies "$OUT" --intro docs/findings_intro.md
