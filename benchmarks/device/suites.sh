# shellcheck shell=bash
# The GPU runs' cases, in one place: `run.sh --suite NAME` runs suite_NAME's steps in order.
#
# A step is `step NAME BUDGET_S COMMAND...`: COMMAND runs under `timeout BUDGET_S`, its output goes
# to $OUT/NAME.txt (and the console), and run.txt gets a line with the seconds it took and how it
# ended. A benchmark step writes its rows to $OUT/NAME.json as each is measured.
#
# Every suite must fit the run's deadline (DEADLINE_S in run.sh: 450 s, so that a run ends within
# 8 minutes on an H100 with room to spare): its budgets add up to DEADLINE_S less SETUP_BUDGET_S
# at most (run.sh checks this before it starts). And it may leave at most 7 files in $OUT beside
# run.txt: the device tool brings back 8.
#
# What run.sh sets for the steps: PYTHON; BENCH, benchmarks/gpu_engine.py with the run's preset
# and size (sd-turbo at 512 on the GPU, the tiny model at 64 in a dry run; a later --preset or
# --size wins: SDXL_PRESET is sdxl-turbo on the GPU and tiny-sdxl in a dry run, LARGE_SIZE 1024
# and 128), frames, compile
# backend (inductor, or eager in a dry run) and row timeout; VIDEO, benchmarks/video.py with the
# run's video preset (wan-1.3b on the GPU, tiny in a dry run), frames and row timeout, and its
# two sizes, VIDEO_WIDE_SIZE (480x832, or 64x112 in a dry run) and VIDEO_SQUARE_SIZE (512x512,
# or 64x64); GPU_TESTS, the test files that hold gpu-marked tests; PYTEST, pytest with the
# options of an unattended run; OUT.

# The engine: the CUDA tests, then sd-turbo eager (steps, ControlNets, sessions, diffusers; the
# steps and sessions cases with one batch in flight and with two, issue 18, side by side: eager
# is where launching the next batch while the GPU computes pays), then compiled with CUDA graphs
# for buckets 1 and 4 (six cold inductor compiles: UNet, TAESD encoder and decoder, each at two
# batch sizes).
suite_engine() {
    step tests 90 "${PYTEST[@]}" "${GPU_TESTS[@]}"
    step engine-eager 90 "${BENCH[@]}" --compile off --in-flight 1 2 \
        --json "$OUT/engine-eager.json"
    step engine-compiled 240 "${BENCH[@]}" --compile on --no-diffusers --buckets 1 4 \
        --sessions 1 2 4 --json "$OUT/engine-compiled.json"
}

# The second run, of the same shape and deadline: what the engine run leaves out (compiled
# buckets 2 and 8), issue 20's temporal tools, and the place for the next wave's cases (22's
# SDXL-Turbo and IP-Adapter, 23's video pipeline): one `step` line each, with its own budget,
# taken from this one's until the budgets fill DEADLINE_S.
suite_next() {
    step engine-compiled-2-8 240 "${BENCH[@]}" --compile on --no-diffusers --buckets 2 8 \
        --steps 2 --sessions 2 8 --json "$OUT/engine-compiled-2-8.json"
    # issue 20: every temporal setting (feedback, latent feedback, do_add_noise, motion noise,
    # the feature bank at 1, 2 and 4 frames, TemporalNet, combinations) on sd-turbo's shapes
    # with random weights: ms per frame and its ratio to off (flicker needs real weights)
    step temporal 150 "$PYTHON" benchmarks/temporal.py --preset "$PRESET" --size "$SIZE" \
        --frames $((FRAMES > 3 ? FRAMES : 3)) --still $((FRAMES / 2)) --repeats 1 \
        --out "$OUT" --name temporal
    # issue 18: FP8 against bf16 (sd-turbo eager, one step, one session, half the frames: two
    # loads in 30 s; the UNet in bfloat16, then FP8): ms per frame of each and the PSNR of FP8's
    # output frames against bf16's (the bf16 row is written first, whatever the budget leaves)
    step fp8 30 "${BENCH[@]}" --fp8 --compile off --steps 1 --sessions 1 --controlnets \
        --no-diffusers --frames $((FRAMES / 2 > 2 ? FRAMES / 2 : 2)) --json "$OUT/fp8.json"
}

# The third run, of the same shape and deadline: issue 22's models. SDXL-Turbo (random weights of
# the published architecture: two text encoders, 2.6 B UNet, TAESD) eager at 512x512 (1 step;
# 1, 2 and 4 sessions; a ControlNet; an IP-Adapter with a style image; diffusers' SDXL img2img
# beside it) and at 1024x1024, and LoRA's cost (benchmarks/lora.py).
suite_models() {
    step sdxl-512 170 "${BENCH[@]}" --preset "$SDXL_PRESET" --compile off --steps 1 \
        --sessions 1 2 4 --controlnets none canny --ip-adapter --json "$OUT/sdxl-512.json"
    step sdxl-1024 150 "${BENCH[@]}" --preset "$SDXL_PRESET" --size "$LARGE_SIZE" \
        --compile off --steps 1 --sessions 1 2 --controlnets --no-diffusers \
        --json "$OUT/sdxl-1024.json"
    # LoRA on and off (sd-turbo's UNet, a rank-8 LoRA): fused against peft adapters, per UNet
    # call and per weight change, and the graphs a weight change recompiles
    step lora 80 "$PYTHON" benchmarks/lora.py --preset "$PRESET" --size "$SIZE" \
        --iterations 20 --repeats 3 --out "$OUT" --name lora
}

# The fourth run, of the same shape and deadline: issue 23's causal video pipeline (Wan 2.1 T2V
# 1.3B transformer and VAE and UMT5-XXL, random weights built on the GPU in bf16), at 480x832
# and 512x512: 1 and 4 steps, 1 and 2 sessions, saturating and at a 24 fps source; fps per
# session and in all, chunk and first-frame latency, peak GPU memory (benchmarks/video.py). At
# 480x832 also the cache written by the last step (one transformer pass fewer a chunk), saturating:
# its throughput against the clean write's. 512x512 has 2/3 of the tokens, so less budget.
suite_video() {
    step video-480x832 240 "${VIDEO[@]}" --size "$VIDEO_WIDE_SIZE" \
        --cache-write clean last_step --json "$OUT/video-480x832.json"
    step video-512 180 "${VIDEO[@]}" --size "$VIDEO_SQUARE_SIZE" --json "$OUT/video-512.json"
}

# The fifth run, of the same shape and deadline: issue 18's compiled variants that the engine run
# leaves out. ControlNet batches compiled in the buckets (a canny ControlNet and the UNet's
# residual variant planned at buckets 1 and 4 as the ControlNet is added: four more cold inductor
# compiles beside the six of the plain call), and the FP8 UNet compiled against bf16 compiled
# (bucket 1, one step, one session: the figure that matters for serving; the bf16 row first).
suite_compiled() {
    step compiled-controlnets 240 "${BENCH[@]}" --compile on --no-diffusers --buckets 1 4 \
        --steps 1 --sessions 2 4 --compiled-controlnets none canny \
        --json "$OUT/compiled-controlnets.json"
    step fp8-compiled 180 "${BENCH[@]}" --fp8 --compile on --buckets 1 --steps 1 --sessions 1 \
        --controlnets --no-diffusers --frames $((FRAMES / 2 > 2 ? FRAMES / 2 : 2)) \
        --json "$OUT/fp8-compiled.json"
}

# The sixth run, of the same shape and deadline: issue 18's frame graph (a plain batch as one
# function: encode, the stream batch's steps, UNet and decode; compiled, ONE CUDA graph per
# bucket), each engine with it off (staged: three graphs and the step math between them in
# eager code) and on, side by side. Eager first (1, 2 and 4 steps; 1 and 4 sessions), then
# compiled at buckets 1 and 4 (the staged engine's six cold compiles, then the frame engine's
# six again from the FX graph cache and its two frame graphs cold).
suite_frame() {
    step frame-eager 50 "${BENCH[@]}" --compile off --frame-graph off on --steps 1 2 4 \
        --sessions 1 4 --controlnets --no-diffusers --json "$OUT/frame-eager.json"
    step frame-compiled 360 "${BENCH[@]}" --compile on --frame-graph off on --buckets 1 4 \
        --steps 1 --sessions 2 4 --controlnets --no-diffusers --json "$OUT/frame-compiled.json"
}
