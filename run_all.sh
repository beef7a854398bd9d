#!/usr/bin/env bash
# The paper as a recipe: every stage in order over JSONL files, each logged and resumable.
#
#   bash run_all.sh                     # CPU: embedded SmolLM2-135M, built-in problems
#   PRESET=tiny bash run_all.sh         # smoke run of every stage in a few minutes
#   SOURCE=gsm8k GSM8K_TRAIN=train.jsonl GSM8K_TEST=test.jsonl bash run_all.sh
#   SOURCE=math MATH_TRAIN=train.jsonl MATH_TEST=test.jsonl ANNOTATOR=api \
#       ANNOTATOR_MODEL=Qwen/Qwen2.5-72B-Instruct ANNOTATOR_URL=http://localhost:8000/v1 bash run_all.sh
#       (toy MATH-format files to try it on: tests/fixtures/math_{train,test}_tiny.jsonl)
#   PRESET=paper BACKEND=vllm ACTOR=meta-llama/Meta-Llama-3-8B-Instruct \
#       CRITIC_BASE=meta-llama/Meta-Llama-3-8B-Instruct bash run_all.sh   # GPUs
#
# Every knob below is an environment variable; the preset only sets defaults. A finished stage
# leaves $OUT/logs/NN.done and is skipped on a rerun; a killed stage resumes from its own files.
# Remove $OUT (or one .done file) to redo work.
set -euo pipefail
cd "$(dirname "$0")"

# Presets: each sets defaults only (`: "${VAR:=value}"` keeps a value you exported).
PRESET=${PRESET:-default}
case $PRESET in
  # The CPU presets turn the N/k filter off (FILTER_K=0) and add the reference solutions as
  # correct paths: the 135M actor almost never refines correctly (the tiny run kept 1 of 16
  # flawed critiques at N=2, k=1) nor writes a correct path, which would leave the critic
  # nothing to learn from. They also balance the critic data and hold out a quarter of the
  # problems. The paper preset applies the filter.
  tiny)
    : "${N_TRAIN:=60}" "${N_TEST:=8}" "${ERR_PROBLEMS:=4}" "${RG_SAMPLES:=2}"
    : "${METHODS:=rg1,rg2,rg3,reference}" "${FILTER_N:=2}" "${FILTER_K:=0}"
    : "${EPOCHS:=1}" "${TRAIN_ROWS:=48}" "${EVAL_ROWS:=8}" "${VAL_FRACTION:=0.25}" "${BALANCE:=1}"
    : "${TEST_PROBLEMS:=4}" "${K_VALUES:=1,2}" "${DIFF_SAMPLES:=4}"
    : "${ACTOR_TOKENS:=96}" "${CRITIC_TOKENS:=160}" ;;
  # The default's critic data comes from one writer: reference solutions and mistakes the
  # program inserts into them (RG3, program continuation; no model call), so a critic cannot
  # pass paths by their style. 400 balanced rows, 1 epoch: about 10 minutes of training on 2 CPU
  # cores, the largest point of the learning curve (README) that fits 12 minutes.
  default)
    : "${N_TRAIN:=2000}" "${N_TEST:=200}" "${ERR_PROBLEMS:=400}" "${RG_SAMPLES:=4}"
    : "${METHODS:=rg3,reference}" "${RG3_CONTINUE:=program}" "${FILTER_N:=4}" "${FILTER_K:=0}"
    : "${EPOCHS:=1}" "${TRAIN_ROWS:=400}" "${EVAL_ROWS:=120}" "${VAL_FRACTION:=0.25}" "${BALANCE:=1}"
    : "${TEST_PROBLEMS:=20}" "${K_VALUES:=1,2}" "${DIFF_SAMPLES:=8}"
    : "${ACTOR_TOKENS:=192}" "${CRITIC_TOKENS:=384}" ;;
  paper)
    : "${N_TRAIN:=0}" "${N_TEST:=0}" "${ERR_PROBLEMS:=0}" "${RG_SAMPLES:=10}"
    : "${METHODS:=rg1,rg2,rg3}" "${FILTER_N:=8}" "${FILTER_K:=2}"
    : "${EPOCHS:=5}" "${TRAIN_ROWS:=0}" "${EVAL_ROWS:=500}" "${VAL_FRACTION:=0.1}" "${BALANCE:=0}"
    : "${TEST_PROBLEMS:=0}" "${K_VALUES:=1,2,4,8,16,32}" "${DIFF_SAMPLES:=32}"
    : "${ACTOR_TOKENS:=1024}" "${CRITIC_TOKENS:=1536}" ;;
  *) echo "PRESET must be tiny, default or paper" >&2; exit 2 ;;
esac
# What each knob means (0 means "all" wherever it is a count of problems or rows):
#   N_TRAIN, N_TEST   built-in problems per split (0 = all of a real data set)
#   ERR_PROBLEMS      problems stage 01 makes flawed paths for
#   RG_SAMPLES        RG1 samples per problem (RG2/RG3 use half); METHODS: stage 01's generators
#   FILTER_N, FILTER_K  stage 03: N refinements per critique, keep it if >= K are right (0 = off)
#   EPOCHS, TRAIN_ROWS  critic training epochs and cap on its SFT rows
#   EVAL_ROWS         held-out critiques the trained critic is scored on
#   VAL_FRACTION      share of problems whose paths the critic never sees
#   BALANCE           1: train the critic on as many correct as flawed paths
#   TEST_PROBLEMS, K_VALUES, DIFF_SAMPLES  stage 05: problems, K for equal budget, samples per
#                     problem for the difficulty bins
#   ACTOR_TOKENS, CRITIC_TOKENS  generation budgets of one solution / one critique
SOURCE=${SOURCE:-builtin}              # builtin | gsm8k | math
ACTOR=${ACTOR:-smollm2-135m}           # any HF id or local path
CRITIC_BASE=${CRITIC_BASE:-$ACTOR}     # the model the critic is fine-tuned from
BACKEND=${BACKEND:-auto}               # auto | hf | vllm
DEVICE=${DEVICE:-}                     # cuda | npu | cpu (empty: best available)
LR=${LR:-1e-4}                         # 1e-4 suits a 135M model on a few hundred rows; paper: 5e-6
RG3_CONTINUE=${RG3_CONTINUE:-actor}    # rg3 after the mistake: actor (paper) | program (no model call)
# 02's annotator, and for MATH the 06/07 critic too: rules (exact, arithmetic only) | model | api.
ANNOTATOR=${ANNOTATOR:-rules}
ANNOTATOR_MODEL=${ANNOTATOR_MODEL:-}   # model: HF id or folder; api: the served model's name
ANNOTATOR_URL=${ANNOTATOR_URL:-http://localhost:8000/v1}
if [[ $SOURCE == math && $ANNOTATOR == rules ]]; then
  # MATH solutions are LaTeX algebra: the rules checker could only label them blindly.
  echo "error: SOURCE=math needs an annotator that reads LaTeX; the default rules annotator checks" \
       "arithmetic only. Set ANNOTATOR=model ANNOTATOR_MODEL=<HF id or folder>, or ANNOTATOR=api" \
       "ANNOTATOR_MODEL=<served model name> ANNOTATOR_URL=<OpenAI-compatible base URL>" >&2
  exit 2
fi
if [[ $ANNOTATOR != rules && -z $ANNOTATOR_MODEL ]]; then
  echo "error: ANNOTATOR=$ANNOTATOR needs ANNOTATOR_MODEL" >&2; exit 2
fi
case $ANNOTATOR in
  rules) annotate=(--annotator rules); math_critic=rules ;;
  model) annotate=(--annotator model --annotator-model "$ANNOTATOR_MODEL"); math_critic=$ANNOTATOR_MODEL ;;
  api)   annotate=(--annotator api --annotator-model "$ANNOTATOR_MODEL" --annotator-url "$ANNOTATOR_URL")
         math_critic=api:$ANNOTATOR_MODEL ;;
  *) echo "error: ANNOTATOR must be rules, model or api" >&2; exit 2 ;;
esac
# RG3 on MATH: the program inserter needs `a op b = c`, so a model rewrites the other steps.
if [[ $SOURCE == math ]]; then : "${RG3_INSERTER:=auto}"; else : "${RG3_INSERTER:=program}"; fi
if [[ $ANNOTATOR == model ]]; then : "${INSERTER_MODEL:=$ANNOTATOR_MODEL}"; else : "${INSERTER_MODEL:=$ACTOR}"; fi
OUT=${OUT:-out/$PRESET}
DATA=${DATA:-$OUT/data}
PY=${PY:-.venv/bin/python}

bash setup.sh
mkdir -p "$OUT/logs"
common=(--backend "$BACKEND")
[[ -n $DEVICE ]] && common+=(--device "$DEVICE")

stage() {  # stage NAME COMMAND...: run once, log to $OUT/logs/NAME.log, mark done
  local name=$1; shift
  if [[ -f $OUT/logs/$name.done ]]; then echo "== $name: done already (rm $OUT/logs/$name.done to redo)"; return; fi
  echo "== $name: $*"
  local start=$SECONDS
  PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "$OUT/logs/$name.log"
  echo "== $name: finished in $((SECONDS - start)) s"
  touch "$OUT/logs/$name.done"
}

# --- 00 problems
prep=(--source "$SOURCE" --out-dir "$DATA")
case $SOURCE in
  builtin) prep+=(--n-train "$N_TRAIN" --n-test "$N_TEST") ;;
  gsm8k) [[ -n ${GSM8K_TRAIN:-} ]] && prep+=(--gsm8k-train "$GSM8K_TRAIN")
         [[ -n ${GSM8K_TEST:-} ]] && prep+=(--gsm8k-test "$GSM8K_TEST") ;;
  math)  [[ -n ${MATH_TRAIN:-} ]] && prep+=(--math-train "$MATH_TRAIN")
         [[ -n ${MATH_TEST:-} ]] && prep+=(--math-test "$MATH_TEST") ;;
esac
stage 00_prepare_data $PY 00_prepare_data.py "${prep[@]}"

# --- 01-03 AutoMathCritique: flawed paths -> step-level critiques -> keep the helpful ones
half=$(( (RG_SAMPLES + 1) / 2 ))
stage 01_generate_errors $PY 01_generate_errors.py --problems "$DATA/${SOURCE}_train.jsonl" \
  --out "$OUT/paths.jsonl" --actor "$ACTOR" --methods "$METHODS" --limit "$ERR_PROBLEMS" "${common[@]}" \
  --rg1-samples "$RG_SAMPLES" --rg2-samples "$half" --rg3-samples "$half" --rg3-continue "$RG3_CONTINUE" \
  --rg3-inserter "$RG3_INSERTER" --inserter-model "$INSERTER_MODEL" --max-new-tokens "$ACTOR_TOKENS"
stage 02_annotate $PY 02_annotate.py --paths "$OUT/paths.jsonl" --out "$OUT/annotations.jsonl" \
  "${annotate[@]}" "${common[@]}"
stage 03_filter $PY 03_filter.py --annotations "$OUT/annotations.jsonl" --out-dir "$OUT" \
  --actor "$ACTOR" --n "$FILTER_N" --k "$FILTER_K" --max-new-tokens "$ACTOR_TOKENS" "${common[@]}"

# --- 04 critic training, 05 the critic at test time
balance=(); [[ $BALANCE == 1 ]] && balance=(--balance)
stage 04_train_critic $PY 04_train_critic.py --data "$OUT/critic_sft.jsonl" \
  --model "$CRITIC_BASE" --out-dir "$OUT/critic" --epochs "$EPOCHS" --lr "$LR" \
  --val-fraction "$VAL_FRACTION" "${balance[@]}" --max-train-rows "$TRAIN_ROWS" \
  --max-eval-rows "$EVAL_ROWS" --eval-max-new-tokens "$CRITIC_TOKENS" "${common[@]}"
# Step-labelled paths on test problems (inserted mistakes at known steps + reference solutions)
# for 05's ProcessBench-style score: the critic has never seen these problems.
stage 05_test_paths $PY 01_generate_errors.py --problems "$DATA/${SOURCE}_test.jsonl" \
  --out "$OUT/test_paths.jsonl" --actor "$ACTOR" --methods rg3,reference --limit "$TEST_PROBLEMS" \
  --fewshot-pool "$DATA/${SOURCE}_train.jsonl" --rg3-samples 1 --rg3-inserter "$RG3_INSERTER" \
  --inserter-model "$INSERTER_MODEL" --max-new-tokens "$ACTOR_TOKENS" "${common[@]}"
stage 05_test_time $PY 05_test_time.py --problems "$DATA/${SOURCE}_test.jsonl" \
  --actor "$ACTOR" --critic "$OUT/critic" --out-dir "$OUT/test_time" --limit "$TEST_PROBLEMS" \
  --k-values "$K_VALUES" --difficulty-samples "$DIFF_SAMPLES" --processbench "$OUT/test_paths.jsonl" \
  --fewshot-pool "$DATA/${SOURCE}_train.jsonl" \
  --actor-max-new-tokens "$ACTOR_TOKENS" --critic-max-new-tokens "$CRITIC_TOKENS" "${common[@]}"

# --- 06 self-improvement: vanilla vs critique-in-the-loop (SI_* knobs; iteration 0 and vanilla
# are shared by runs with another SI_CRITIC). The CPU presets use the rules critic: the trained
# 135M critic misses most of the actor's mistakes (05 in the README: it flags 15 of 38 wrong
# answers); SI_CRITIC=$OUT/critic runs it (README, 06 section).
# The paper preset uses 04's critic.
case $PRESET in
  tiny)    : "${SI_TRAIN:=4}" "${SI_TEST:=4}" "${SI_N:=2}" "${SI_ITERATIONS:=1}" "${SI_LR:=1e-4}" \
             "${SI_DIFF:=2}" "${SI_TOKENS:=64}" "${SI_BATCH:=4}" "${SI_ACCUM:=1}" ;;
  default) : "${SI_TRAIN:=16}" "${SI_TEST:=16}" "${SI_N:=2}" "${SI_ITERATIONS:=2}" "${SI_LR:=1e-4}" \
             "${SI_DIFF:=2}" "${SI_TOKENS:=128}" "${SI_BATCH:=4}" "${SI_ACCUM:=1}" ;;
  paper)   : "${SI_TRAIN:=0}" "${SI_TEST:=0}" "${SI_N:=2,4,8}" "${SI_ITERATIONS:=3}" "${SI_LR:=5e-6}" \
             "${SI_DIFF:=8}" "${SI_TOKENS:=$ACTOR_TOKENS}" "${SI_BATCH:=8}" "${SI_ACCUM:=32}" ;;
esac
if [[ $PRESET == paper ]]; then : "${SI_CRITIC:=$OUT/critic}"; else : "${SI_CRITIC:=rules}"; fi
if [[ $SOURCE == math && $SI_CRITIC == rules ]]; then SI_CRITIC=$math_critic; fi  # rules cannot judge LaTeX
: "${SI_METHOD:=both}"   # vanilla | critique | both; SI_CRITIC: a model folder or id, rules, api:MODEL
stage 06_self_improve $PY 06_self_improve.py --train-problems "$DATA/${SOURCE}_train.jsonl" \
  --test-problems "$DATA/${SOURCE}_test.jsonl" --actor "$ACTOR" --critic "$SI_CRITIC" --method "$SI_METHOD" \
  --n "$SI_N" --iterations "$SI_ITERATIONS" --train-limit "$SI_TRAIN" --test-limit "$SI_TEST" --lr "$SI_LR" \
  --difficulty-samples "$SI_DIFF" --actor-max-new-tokens "$SI_TOKENS" --critic-max-new-tokens "$CRITIC_TOKENS" \
  --batch-size "$SI_BATCH" --grad-accum "$SI_ACCUM" --critic-url "$ANNOTATOR_URL" --out-dir "$OUT/self_improve" "${common[@]}"

# --- 07 self-talk: one model that reflects after each step, vs trajectory-level self-correction
# and the two-player setup (TALK_* knobs). The CPU presets build the data with the rules critic:
# the trained 135M critic passes most wrong steps, so few chains would get corrected; with
# rules the two-player column is an oracle (it knows the gold answer), and TALK_EVAL_CRITIC swaps it.
case $PRESET in
  tiny)    : "${TALK_PATHS:=8}" "${TALK_ROUNDS:=2}" "${TALK_CANDIDATES:=2}" "${TALK_TEST:=4}" "${TALK_SAMPLES:=2}" \
             "${TALK_EPOCHS:=1}" "${TALK_TOKENS:=96}" "${TALK_BATCH:=4}" "${TALK_ACCUM:=1}" "${TALK_CRITIC:=rules}" ;;
  default) : "${TALK_PATHS:=32}" "${TALK_ROUNDS:=4}" "${TALK_CANDIDATES:=4}" "${TALK_TEST:=12}" "${TALK_SAMPLES:=4}" \
             "${TALK_EPOCHS:=3}" "${TALK_TOKENS:=192}" "${TALK_BATCH:=8}" "${TALK_ACCUM:=1}" "${TALK_CRITIC:=rules}" ;;
  paper)   : "${TALK_PATHS:=0}" "${TALK_ROUNDS:=4}" "${TALK_CANDIDATES:=4}" "${TALK_TEST:=0}" "${TALK_SAMPLES:=8}" \
             "${TALK_EPOCHS:=3}" "${TALK_TOKENS:=$ACTOR_TOKENS}" "${TALK_BATCH:=8}" "${TALK_ACCUM:=32}" \
             "${TALK_CRITIC:=$OUT/critic}" ;;
esac
if [[ $SOURCE == math && $TALK_CRITIC == rules ]]; then TALK_CRITIC=$math_critic; fi
: "${TALK_LR:=$LR}" "${TALK_EVAL_CRITIC:=$TALK_CRITIC}" "${TALK_REWRITER:=template}"  # rewriter: template, model, api:MODEL
stage 07_self_talk $PY 07_self_talk.py --annotations "$OUT/annotations.jsonl" \
  --problems "$DATA/${SOURCE}_test.jsonl" --fewshot-pool "$DATA/${SOURCE}_train.jsonl" --actor "$ACTOR" \
  --critic "$TALK_CRITIC" --eval-critic "$TALK_EVAL_CRITIC" --rewriter "$TALK_REWRITER" \
  --max-paths "$TALK_PATHS" --max-rounds "$TALK_ROUNDS" --candidates "$TALK_CANDIDATES" --limit "$TALK_TEST" \
  --samples "$TALK_SAMPLES" --epochs "$TALK_EPOCHS" --lr "$TALK_LR" --batch-size "$TALK_BATCH" \
  --grad-accum "$TALK_ACCUM" --max-new-tokens "$TALK_TOKENS" --critic-max-new-tokens "$CRITIC_TOKENS" \
  --critic-url "$ANNOTATOR_URL" --out-dir "$OUT/self_talk" "${common[@]}"

echo "== all stages done; results in $OUT (critic_sft.stats.md, critic/eval.json, test_time/metrics.md, self_improve/report-*/metrics.md, self_talk/metrics.md)"
