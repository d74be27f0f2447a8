#!/usr/bin/env bash
# `make smoke-gpu`: the first runs on a GPU machine. docs/gpu-checklist.md says what each should print and
# produce, and how to report a failure.
#   1. one GPU:  SmolLM2-135M (model=smollm2), LPC-DPO (latent=discrete), bf16, 20 steps
#   2. 8 GPUs:   the tiny model under DeepSpeed ZeRO-3 (accelerate launch --config_file .../zero3.yaml --num_processes 8)
#   3. 8 GPUs:   Llama-3-8B (model=llama3_8b) under ZeRO-3 on the synthetic pairs (not its default UltraFeedback, whose
#                reference scoring of ~61k pairs would dwarf a smoke test), 20 steps; it downloads meta-llama/Meta-Llama-3-8B (a
#                gated repository: `huggingface-cli login` first) unless SMOKE_LLAMA_ARGS=model.name_or_path=<local copy>
#   4. one GPU:  QLoRA (adapter=qlora: SmolLM2's base in 4 bits with bitsandbytes, a LoRA adapter and the latent train),
#                bf16, 20 steps; skipped, saying so, where bitsandbytes is not installed (pip install -e '.[qlora]').
#                SMOKE_QLORA_ARGS="model=llama3_8b data=synthetic" runs it on Llama-3-8B instead (the one-GPU case)
# Where torch sees no CUDA device it prints "no CUDA: skipping ..." and exits 0.
#
# Settings (environment): SMOKE_STEPS ("1 2 3 4") which steps; SMOKE_GPUS (8) the processes of steps 2 and 3 (a
# machine with fewer GPUs skips them, saying so, unless SMOKE_GPUS is lowered); SMOKE_DIR the output directory;
# SMOKE_ARGS extra overrides for every step; SMOKE_LLAMA_ARGS extra overrides for step 3; SMOKE_QLORA_ARGS for step 4;
# PY the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${SMOKE_STEPS:-1 2 3 4}
GPUS=${SMOKE_GPUS:-8}
OUT=${SMOKE_DIR:-outputs/smoke-gpu/$(date +%Y-%m-%d_%H-%M-%S)}
read -r -a EXTRA <<< "${SMOKE_ARGS:-}"
read -r -a LLAMA_EXTRA <<< "${SMOKE_LLAMA_ARGS:-}"
read -r -a QLORA_EXTRA <<< "${SMOKE_QLORA_ARGS:-}"

ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$ngpu" -eq 0 ]; then
  echo "no CUDA: skipping make smoke-gpu (torch $("$PY" -c 'import torch; print(torch.__version__)') sees no GPU:" \
    "torch.cuda.is_available() is False). Nothing was run."
  exit 0
fi
mkdir -p "$OUT"
echo "smoke-gpu: $ngpu GPU(s) ($("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')); output in $OUT"
"$PY" - > "$OUT/environment.txt" <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for pkg in ("accelerate", "transformers", "deepspeed", "flash-attn", "peft", "bitsandbytes"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
EOF
cat "$OUT/environment.txt"

LAUNCH=("$PY" -m accelerate.commands.launch --config_file src/lpc/training/accelerate/zero3.yaml
        --num_processes "$GPUS" --main_process_port "${SMOKE_PORT:-29571}")
# Every run logs every step (step 1's loss is checked against ln 2) and checkpoints at step 10.
COMMON=(trainer.max_steps=20 trainer.log_every=1 trainer.save_every=10 trainer.eval_every=0 latent=discrete)
failed=() skipped=() passed=()

# peak memory.used per GPU (MiB) while a step runs, sampled by nvidia-smi every 0.5 s
start_monitor() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$1" 2> /dev/null &
    echo $!
  else
    echo ""
  fi
}
stop_monitor() {
  [ -n "$1" ] && kill "$1" 2> /dev/null && wait "$1" 2> /dev/null || true
  if [ -s "$2" ]; then
    awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "  GPU %s peak memory.used %d MiB\n", g, m[g] }' "$2" \
      | sort -n -k2 | tee "${2%.csv}.txt"
  else
    echo "  (no nvidia-smi: no memory samples)"
  fi
}

# run NAME EXPECTED_PROCESSES COMMAND...: the command's output goes to $OUT/NAME.log; then metrics.json is checked.
# FINAL=adapter (set for the call): final/ must hold an adapter (adapter_config.json, adapter_model.safetensors), and the
# log the adapter's share of the parameters that train; else a full model (config.json, model.safetensors).
run() {
  local name=$1 procs=$2
  shift 2
  local dir="$OUT/$name" log="$OUT/$name.log"
  echo
  echo "== $name: $*"
  local mon
  mon=$(start_monitor "$OUT/$name.gpu_mem.csv")
  local t0=$SECONDS rc=0
  "$@" "hydra.run.dir=$dir" > "$log" 2>&1 || rc=$?
  stop_monitor "$mon" "$OUT/$name.gpu_mem.csv"
  echo "  exit code $rc after $((SECONDS - t0)) s; log: $log"
  if [ "$rc" -ne 0 ]; then
    echo "  FAILED. The first error lines, then the last lines of $log:"
    grep -m 5 -E "Error|error:" "$log" | sed 's/^/    /' || true
    echo "    ..."
    tail -n 25 "$log" | sed 's/^/    /'
    failed+=("$name")
    return 0
  fi
  if "$PY" - "$dir" "$procs" "${FINAL:-model}" "$log" <<'EOF'; then passed+=("$name"); else failed+=("$name"); fi
import json, math, re, sys
from pathlib import Path

run, procs, final, log_file = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
m = json.loads((run / "metrics.json").read_text())
log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
first = next(r for r in log if "loss" in r)
keys = ["status", "train/steps", "train/num_processes", "train/global_batch_size", "train/gradient_accumulation_steps",
        "train/wall_time_s", "eval/loss", "eval/margin", "eval/pref_accuracy", "eval/pref_accuracy/z_zero",
        "eval/codes_used", "eval/latent/inert", "eval/latent/z_hidden_norm_ratio", "eval/lm/nll_ratio",
        "eval/lm/text_nll/zero", "eval/lm/text_nll/reference", "eval/lm/repeat_rate", "eval/lm/damaged",
        "eval/lm/nll_ratio/prompt_codes_max", "eval/lm/prompt_codes_damaged"]
for k in keys:
    if k in m:
        print(f"  {k} = {m[k]}")
print(
    f"  step {first['step']}: loss {first['loss']:.4f} (ln 2 = {math.log(2):.4f}), latent/kl {first.get('latent/kl')}, "
    f"rewards/margins {first.get('rewards/margins')}, grad_norm {first.get('grad_norm')}"
)
problems = []
if m.get("status") != "completed" or m.get("train/steps") != 20:
    problems.append(f"status {m.get('status')}, {m.get('train/steps')} steps (expected completed, 20)")
if m.get("train/num_processes") != procs:
    problems.append(f"train/num_processes = {m.get('train/num_processes')} (expected {procs})")
if not all(math.isfinite(r["loss"]) for r in log if "loss" in r):
    problems.append("a non-finite loss in train_log.jsonl")
# step 1: the policy is the reference (z = gate x code, the gate starts at 0), so DPO's part of the loss is ln 2
dpo_part = first["loss"] - first.get("latent/kl_weight", 0.0) * first.get("latent/kl", 0.0)
if abs(first.get("rewards/margins", 0.0)) > 1e-3 or abs(dpo_part - math.log(2)) > 0.02:
    problems.append(
        f"step {first['step']}: loss - kl_weight x latent/kl = {dpo_part:.4f}, rewards/margins "
        f"{first.get('rewards/margins')} (expected ln 2 = 0.6931 and 0: the policy must start at the reference)"
    )
if m.get("eval/lm/damaged"):
    problems.append(
        f"eval/lm/damaged: plain-text NLL ratio {m.get('eval/lm/nll_ratio')} (at most 1.05), greedy answers' "
        f"repeat rate {m.get('eval/lm/repeat_rate')} (reference {m.get('eval/lm/repeat_rate/reference')})"
    )
if m.get("eval/lm/prompt_codes_damaged"):  # reported, not a failure: at the defaults it is expected (docs/method.md §7)
    print(
        f"  note: a code the prompts get raises plain text's NLL to {m['eval/lm/nll_ratio/prompt_codes_max']:.3f} of "
        "z = 0's (over 1.05); latent.lm_kl_weight=1 is the measured option against it (docs/method.md §7)"
    )
files = ["final/config.json", "final/model.safetensors"]
if final == "adapter":
    files = ["final/adapter_config.json", "final/adapter_model.safetensors"]
    share = re.search(r"adapter=\w+: ([\d,]+) of ([\d,]+) parameters train \(([\d.]+)%\)", log_file.read_text())
    print(f"  trainable: {share.group(0) if share else 'no adapter line in the log'}")
    if share is None or float(share.group(3)) >= 5:
        problems.append("the log does not say that under 5% of the parameters train (adapter=...: N of M parameters train)")
for f in files + ["final/latent.safetensors", "checkpoints/step-20"]:
    if not any(run.glob(f + "*")):
        problems.append(f"no {f}")
for p in problems:
    print("  PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
}

need_gpus() {  # need_gpus NAME: whether the multi-GPU step NAME can run here
  if [ "$ngpu" -lt "$GPUS" ]; then
    echo
    echo "== $1: needs $GPUS GPUs, found $ngpu: SKIPPED (SMOKE_GPUS=$ngpu runs it on $ngpu)"
    skipped+=("$1")
    return 1
  fi
}

for step in $STEPS; do
  case $step in
    1) run 1-smollm2-1gpu 1 "$PY" src/train.py model=smollm2 trainer.precision=bf16 "${COMMON[@]}" "${EXTRA[@]}" ;;
    2) need_gpus 2-tiny-zero3 && run 2-tiny-zero3 "$GPUS" "${LAUNCH[@]}" src/train.py distributed=zero3 model=tiny \
         trainer.precision=bf16 "${COMMON[@]}" "${EXTRA[@]}" ;;
    3) need_gpus 3-llama3_8b-zero3 && run 3-llama3_8b-zero3 "$GPUS" env HF_HUB_OFFLINE=0 "${LAUNCH[@]}" \
         src/train.py distributed=zero3 model=llama3_8b data=synthetic "${COMMON[@]}" "${EXTRA[@]}" "${LLAMA_EXTRA[@]}" ;;
    4) if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("bitsandbytes") is None)'; then
         echo
         echo "== 4-qlora-1gpu: bitsandbytes is not installed: SKIPPED (pip install -e '.[qlora]' runs it)"
         skipped+=("4-qlora-1gpu")
       else
         offline=1; [ ${#QLORA_EXTRA[@]} -gt 0 ] && offline=0  # SMOKE_QLORA_ARGS may name a hub model to download
         FINAL=adapter run 4-qlora-1gpu 1 env HF_HUB_OFFLINE=$offline "$PY" src/train.py \
           model=smollm2 adapter=qlora distributed=none hardware.gpus_per_node=1 trainer.precision=bf16 \
           "${COMMON[@]}" "${EXTRA[@]}" "${QLORA_EXTRA[@]}"
       fi ;;
    *) echo "SMOKE_STEPS: no step $step (1, 2, 3 or 4)"; exit 2 ;;
  esac
done

echo
echo "smoke-gpu summary: passed: ${passed[*]:-none}; failed: ${failed[*]:-none}; skipped: ${skipped[*]:-none}"
echo "output: $OUT (report a failure as docs/gpu-checklist.md says)"
[ ${#failed[@]} -eq 0 ]
