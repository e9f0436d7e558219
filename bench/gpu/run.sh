#!/usr/bin/env bash
# The GPU lane: end-to-end tests and benches of ttscale on a GPU host (README, "GPU hosts").
# TTSCALE_GPU_SETUP: a script sourced first that provides vLLM and installs this tree (default: the
# staged environment's /tmp/gpu/in/device-setup.sh, when present); TTSCALE_GPU_MODEL: the real model.
# Run from the repository root on that machine, one or more sections per call:
#   bash bench/gpu/run.sh setup tests        # ~8 min
#   bash bench/gpu/run.sh bench              # overhead ratios, 6 rounds (~8 min)
#   bash bench/gpu/run.sh gsm8k profile      # 150 GSM8K questions, majority@16, concurrency 32 (~5 min);
#                                            # the server under cProfile (~3 min)
# Sections: setup (vLLM, the model, test wheels in .whl/), tests and engine-tests (make test-gpu),
# bench, gsm8k, replicas, profile, logprobs, gc, eval (a resumable `ttscale eval run`), evals (several side by side); accuracy, votes, rejection, pays (bench/accuracy.py on real sets:
# ACC_DATASET, ACC_SUITE, ACC_METHODS (a regex of method names), ACC_LIMIT, ACC_MAX_TOKENS, ACC_TIMEOUT, ACC_CONCURRENCY; longer than one call: start it in the
# background with TTSCALE_GPU_OUT=/tmp/gpu/bg and collect /tmp/gpu/bg in a later call, the
# machine kept warm by calls in between). Logs and results go to /tmp/gpu/out, and, on the device
# tool's machine, into one archive $OUT/gpu-results.tgz (a call brings back at most 8 files).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUTDIR=${TTSCALE_GPU_OUT:-/tmp/gpu/out}
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
# servers of an earlier call that ran out of time (test servers run in sessions of their own)
pkill -9 -f "[m] ttscale[.]cli serve" 2>/dev/null; pkill -9 -f "[E]ngineCore" 2>/dev/null; sleep 1
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu-results.tgz" -C "$OUTDIR" . ; }
trap pack EXIT
MODEL=${TTSCALE_GPU_MODEL:-/tmp/gpu/models/qwen2.5-coder-1.5b-instruct}
SETUP=${TTSCALE_GPU_SETUP:-/tmp/gpu/in/device-setup.sh}
export PYTHONUNBUFFERED=1 TTSCALE_TEST_REAL_MODEL=$MODEL NCCL_NVLS_ENABLE=0
cd "$REPO"
if [ -f "$SETUP" ]; then
  # shellcheck disable=SC1090
  source "$SETUP" >"$OUTDIR/setup.log" 2>&1 || { cat "$OUTDIR/setup.log"; exit 1; }
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu/extra .whl/*.whl \
    >>"$OUTDIR/setup.log" 2>&1
fi
export PYTHONPATH=/tmp/gpu/extra${PYTHONPATH:+:$PYTHONPATH}
status=0
step() {  # step NAME COMMAND...: run, log to $OUTDIR/NAME.log, keep going on failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$OUTDIR/$name.log"
  [ $rc -eq 0 ] || status=1
}
for section in "$@"; do
  case $section in
    setup)
      [ -f "$(dirname "$SETUP")/device-model.sh" ] && step model bash "$(dirname "$SETUP")/device-model.sh"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTDIR/gpu.txt" 2>&1
      python3 -c "import vllm, torch, pytest_asyncio; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
        >> "$OUTDIR/gpu.txt" 2>&1; cat "$OUTDIR/gpu.txt" ;;
    tests)  # the GPU tests and every server test; the session server takes 0.3 of the GPU, so the
            # tests that start servers of their own fit beside it
      export TTSCALE_TEST_SERVER_ARGS="--gpu-memory-utilization 0.3" TTSCALE_FUZZ_EXAMPLES=${TTSCALE_FUZZ_EXAMPLES:-40}
      step test_server timeout ${TESTS_TIMEOUT:-520} python3 -P -m pytest -q -m "gpu or server" -p no:cacheprovider -rs \
        ${TESTS_ARGS:-}
      unset TTSCALE_TEST_SERVER_ARGS ;;
    engine-tests)
      step test_engine timeout 400 python3 -P -m pytest -q -m "vllm and not server and not gpu" -p no:cacheprovider ;;
    bench)
      (cd /tmp && step bench_overhead timeout ${BENCH_TIMEOUT:-560} python3 "$REPO/bench/overhead.py" --model "qwen=$MODEL" \
        --dataset gsm8k --prompts 32 --k 16 --max-tokens 256 --concurrency 32 --rounds ${BENCH_ROUNDS:-6} \
        --phases none,majority,eval --out "$OUTDIR/overhead-gpu.json") ;;
    gsm8k)
      (cd /tmp && step bench_gsm8k timeout 400 python3 "$REPO/bench/overhead.py" --model "qwen=$MODEL" \
        --dataset gsm8k --prompts 150 --k 16 --max-tokens 1024 --concurrency 32 --rounds 2 --phases majority \
        --out "$OUTDIR/gsm8k-gpu.json") ;;
    replicas)  # two vLLM servers on the GPU, 0.3 of it each, behind one ttscale: placement; each
               # request with 40 worked examples of its own (~2.9k prompt tokens), at an arrival rate
               # beyond what the pair serves (~3.5/s at dbc7d88): throughput is capacity there.
               # Prompts that dominate the work, where one prefill per request is worth most:
               # REPLICAS_N=4 REPLICAS_SHARE=0.2 REPLICAS_SHOTS=120 REPLICAS_MAX_MODEL_LEN=16384
      (cd /tmp && step bench_replicas timeout ${REPLICAS_TIMEOUT:-560} python3 "$REPO/bench/replicas.py" \
        --model "qwen=$MODEL" --replicas ${REPLICAS_N:-2} --replica-share ${REPLICAS_SHARE:-0.3} --dataset gsm8k \
        --k ${REPLICAS_K:-16} --max-tokens ${REPLICAS_MAX_TOKENS:-256} --shots ${REPLICAS_SHOTS:-40} \
        --max-model-len ${REPLICAS_MAX_MODEL_LEN:-12288} --rate ${REPLICAS_RATE:-12} \
        --max-connections ${REPLICAS_MAX_CONNECTIONS:-100} \
        --phases ${REPLICAS_PHASES:-affinity,affinity_apart,round_robin,auto,spread} \
        --requests ${REPLICAS_REQUESTS:-48} --rounds ${REPLICAS_ROUNDS:-1} --out "$OUTDIR/replicas-gpu.json") ;;
    accuracy|votes|rejection|pays)  # the strategies on real sets (ACC_DATASET: comma-separated), each
                                    # method a phase of its own; pays = votes and rejection, one server
      case $section in accuracy) suite=real ;; rejection) suite=confidence-rejection ;;
        pays) suite=votes,confidence-rejection ;; *) suite=$section ;; esac
      suite=${ACC_SUITE:-$suite}  # e.g. ACC_SUITE=confidence-rejection: one suite on several sets
      ds=${ACC_DATASET:-math500}; [ "$section" = pays ] && ds=${ACC_DATASET:-math500,gsm8k}
      (cd /tmp && step "bench_$section" timeout ${ACC_TIMEOUT:-560} python3 "$REPO/bench/accuracy.py" --suite "$suite" \
        --model "qwen=$MODEL" --dataset "$ds" --limit ${ACC_LIMIT:-300} --max-tokens ${ACC_MAX_TOKENS:-1024} \
        --temperature 0.7 --concurrency ${ACC_CONCURRENCY:-64} --schedule phased ${ACC_METHODS:+--methods "$ACC_METHODS"} \
        --out "$OUTDIR/{suite}-{dataset}-gpu.json") ;;
    eval)  # ttscale eval run of the real model on a real set, resumable (EVAL_SET, EVAL_K, EVAL_MAX_TOKENS,
           # EVAL_LIMIT, EVAL_TIMEOUT): the run directory stays in /tmp/gpu/runs, so a later call on the same machine
           # continues it (a run brought back as run-*.tar.xz and unpacked there continues on another);
           # each call reports what is recorded so far
      set_=${EVAL_SET:-math500}; k=${EVAL_K:-64}; name=qwen-$set_-k$k; mkdir -p /tmp/gpu/runs
      (cd /tmp && step "eval_$set_" timeout ${EVAL_TIMEOUT:-400} python3 -P -m ttscale.cli eval run "$set_" \
        -m "qwen=$MODEL" -k "$k" --max-tokens ${EVAL_MAX_TOKENS:-1024} --temperature 0.7 \
        --concurrency ${EVAL_CONCURRENCY:-64} ${EVAL_LIMIT:+--limit $EVAL_LIMIT} --out "/tmp/gpu/runs/$name" -q)
      (cd /tmp && step "report_$set_" python3 -P -m ttscale.cli eval report "/tmp/gpu/runs/$name" \
        --out "$OUTDIR/report-$name")
      tar cJf "$OUTDIR/run-$name.tar.xz" -C /tmp/gpu/runs "$name" ;;
    evals)  # several `ttscale eval run`s side by side, one in-process engine each at a share of the GPU: EVALS
            # "SET:K:MAX_TOKENS[:MEM] ..." (default all of GSM8K and MATH-500 at K=64, AIME 2024/2025 and AMC 2023 at
            # K=128 with 4096 tokens), EVALS_MEM (share of GPU memory each), EVALS_STAGGER (most s to wait for one
            # engine's KV cache before the next starts), EVAL_TIMEOUT (s each). At 4b5a9de five engines kept the
            # GPU 100 % busy (time-sliced) and finished in ~8 min 247 GSM8K, 78 MATH-500 (4 min), 16 + 18 AIME
            # and 12 AMC problems: about 30 k tokens/s in all (estimated from typical sample lengths), so the
            # default set (~50 M tokens) needs about 1600 s, about 27 minutes of GPU time. The runs resume: directories
            # stay in /tmp/gpu/runs (unpack archives of earlier calls there to continue them); at the end xz
            # archives go to /tmp/gpu/runs-out (not into the results archive). Bring snapshots back while it
            # runs, since a machine lost to idleness loses them, from each polling call (not run.sh: it stops
            # the engines): for d in /tmp/gpu/runs/qwen-*; do tar -I "xz -T0" -cf "$OUT/${d##*/}.tar.xz"
            # -C /tmp/gpu/runs "${d##*/}"; done
      mkdir -p /tmp/gpu/runs /tmp/gpu/runs-out; pids=()
      # EVALS_FROM=bench/results/eval-runs: unpack the committed records first (a run not there yet) to resume them
      for a in ${EVALS_FROM:+"$REPO/$EVALS_FROM"/*.tar.xz}; do
        [ -f "$a" ] && [ ! -d "/tmp/gpu/runs/$(basename "$a" .tar.xz)" ] && tar -xJf "$a" -C /tmp/gpu/runs && echo "resuming $a"
      done
      for spec in ${EVALS:-gsm8k:64:1024 math500:64:1024 aime24:128:4096 aime25:128:4096 amc23:128:4096}; do
        # SET:K:MAX_TOKENS[:MEM], MEM this run's share of GPU memory (default EVALS_MEM); EVALS_ARGS: more
        # engine options for every run (e.g. "--max-num-seqs 1024")
        IFS=: read -r set_ k mt mem <<<"$spec"; name=qwen-$set_-k$k
        # shellcheck disable=SC2086
        (cd /tmp && step "eval_$set_" timeout ${EVAL_TIMEOUT:-900} python3 -P -m ttscale.cli eval run "$set_" \
          -m "qwen=$MODEL" -k "$k" --max-tokens "$mt" --temperature 0.7 --concurrency ${EVAL_CONCURRENCY:-64} \
          --out "/tmp/gpu/runs/$name" -q --gpu-memory-utilization "${mem:-${EVALS_MEM:-0.17}}" ${EVALS_ARGS:-}) &
        pids+=($!)
        # the next engine starts once this one holds its KV cache: vLLM sizes the cache from the free memory it
        # sees while profiling, so engines profiling at once took each other's memory ("No available memory for
        # the cache blocks", CUDA graph memory measured negative) when started 25 s apart
        for _ in $(seq ${EVALS_STAGGER:-150}); do
          grep -qE "kv cache memory in use|Engine core initialization failed" "$OUTDIR/eval_$set_.log" 2>/dev/null && break
          sleep 1
        done
      done
      for pid in "${pids[@]}"; do wait "$pid" || status=1; done
      nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$OUTDIR/gpu.txt" 2>&1
      for d in /tmp/gpu/runs/qwen-*; do
        tar -I "xz -T0 -6" -cf "/tmp/gpu/runs-out/run-$(basename "$d").tar.xz" -C /tmp/gpu/runs "$(basename "$d")"
      done; ls -la /tmp/gpu/runs-out ;;
    logprobs)  # the serving process's CPU per token of top-20 log-probs, three ways, the real model
      (cd /tmp && step bench_logprobs timeout 300 python3 "$REPO/bench/logprob_path.py" --model "$MODEL" --k 128 \
        --max-tokens 256 --rounds 5 --out "$OUTDIR/logprob-path-gpu.json") ;;
    gc)  # the garbage collector's pauses while candidates with top-20 log-probs run: rows as lists or
         # tuples, the start-up heap tracked or frozen (GC_K, GC_ROUNDS; at K=256 and 3 fan-outs held,
         # one round of the five modes did not finish in 160 s on the H200)
      (cd /tmp && step bench_gc timeout ${GC_TIMEOUT:-400} python3 "$REPO/bench/gc_pauses.py" --model "$MODEL" \
        --k ${GC_K:-64} --max-tokens 256 --hold 3 --rounds ${GC_ROUNDS:-3} --out "$OUTDIR/gc-pauses-gpu.json") ;;
    profile)
      (cd /tmp && step bench_profile timeout 300 python3 "$REPO/bench/overhead.py" --model "qwen=$MODEL" --dataset gsm8k \
        --prompts 64 --k 16 --max-tokens 512 --concurrency 32 --rounds 1 --phases majority_es \
        --profile "$OUTDIR/prof" --out "$OUTDIR/profile-gpu.json")
      python3 -c "import pstats; pstats.Stats('$OUTDIR/prof/server.prof').sort_stats('tottime').print_stats(40)" \
        > "$OUTDIR/prof/top.txt" 2>&1; rm -f "$OUTDIR/prof/server.prof"; head -80 "$OUTDIR/prof/top.txt" ;;
    *) echo "unknown section $section"; status=1 ;;
  esac
done
exit $status
