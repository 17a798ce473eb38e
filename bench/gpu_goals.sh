#!/usr/bin/env bash
# The speed goals' GPU figures in one run, on one H100 / H200 (estimated 9 minutes with the
# compiles; not yet run on a GPU):
#
#   bash bench/gpu_goals.sh                      # results under $OUT (default /tmp/gpu_goals)
#
# 1. Decode of Qwen2.5-0.5B at batch 64, bfloat16 weights, compute and KV cache, random weights,
#    256 new tokens, against the bandwidth bound (bench.sampler_throughput's jax_mem_frac: bytes
#    one step reads x decode steps/s over a measured read roof; goal 40%), once per
#    decode_layers form: "auto" (on a GPU the model's scanned forward_last for this 24-layer
#    scanned model), "unrolled" and "scanned" (the decode step). Then the first form once more,
#    drawing at temperature 1 with top-p NUCLEUS_TOP_P (0.6, the math preset's evaluation; ""
#    skips it): the cost of the top-p cut, a bisection over each row's vocabulary, against the
#    greedy figure of the same form.
# 2. Train-step MFU of Qwen2.5-1.5B in bfloat16 (bench.model_throughput, remat, no torch)
#    against PEAK_TFLOPS (989: the dense bfloat16 peak of an H100 / H200 SXM; goal 40%).
#
# The last lines are one summary line per figure:
#   decode model=<m> batch=<B> decode_layers=<form> decode_form=<what it resolved to> top_p=<p or
#     greedy> tok_s=<x> bandwidth_frac=<f>
#   train preset=<p> batch=<B> seq_len=<L> <the bench's step line, with MFU>
# Every size, and FORMS (the decode_layers forms, default "auto unrolled scanned"), is an
# environment variable (the test runs the script on tiny CPU shapes), and so is PYTHON, the
# interpreter (default python3: a plain python may be absent).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_goals}
DECODE_MODEL=${DECODE_MODEL:-qwen2.5-0.5b}
DECODE_BATCH=${DECODE_BATCH:-64}
NEW_TOKENS=${NEW_TOKENS:-256}
READ_MIB=${READ_MIB:-4096}
REPEATS=${REPEATS:-5}
TRAIN_PRESET=${TRAIN_PRESET:-qwen2.5-1.5b}
TRAIN_BATCH=${TRAIN_BATCH:-16}
TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-4096}
TRAIN_STEPS=${TRAIN_STEPS:-3}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
FORMS=${FORMS:-auto unrolled scanned}
NUCLEUS_TOP_P=${NUCLEUS_TOP_P-0.6}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

decode() {  # decode <form> <output name> [sampler_throughput options]
  local form=$1 name=$2
  shift 2
  "$PYTHON" -m bench.sampler_throughput --models "$DECODE_MODEL" --batch-sizes "$DECODE_BATCH" \
    --compute-dtype bfloat16 --weight-dtype bfloat16 --cache-dtype bfloat16 --new-tokens "$NEW_TOKENS" \
    --read-mib "$READ_MIB" --repeats "$REPEATS" --skip-hf --decode-layers "$form" "$@" \
    --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
}
runs=()
for form in $FORMS; do
  decode "$form" "decode_$form"
  runs+=("decode_$form $form")
done
if [ -n "$NUCLEUS_TOP_P" ]; then
  first=${FORMS%% *}
  decode "$first" decode_nucleus --temperature 1.0 --top-p "$NUCLEUS_TOP_P"
  runs+=("decode_nucleus $first")
fi
"$PYTHON" -m bench.model_throughput --preset "$TRAIN_PRESET" --batch "$TRAIN_BATCH" --seq_len "$TRAIN_SEQ_LEN" \
  --compute_dtype bfloat16 --remat --peak_tflops "$PEAK_TFLOPS" --no_torch --steps "$TRAIN_STEPS" --rounds 1 \
  2>&1 | tee "$OUT/train.txt"

for run in "${runs[@]}"; do
  read -r name form <<< "$run"
  "$PYTHON" - "$OUT/$name.json" "$form" <<'EOF'
import json, sys
for row in json.load(open(sys.argv[1])):
    draw = "greedy" if row["temperature"] == 0 else row["top_p"]
    print(f"decode model={row['model']} batch={row['batch']} decode_layers={sys.argv[2]} "
          f"decode_form={row['decode_form']} top_p={draw} "
          f"tok_s={row['jax_decode_tok_s']:.1f} bandwidth_frac={row['jax_mem_frac']:.3f}")
EOF
done
step=$(grep -m1 '^jax ' "$OUT/train.txt")  # fails the script (set -e) when the bench printed no step line
echo "train preset=$TRAIN_PRESET batch=$TRAIN_BATCH seq_len=$TRAIN_SEQ_LEN $step"
