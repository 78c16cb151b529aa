#!/usr/bin/env bash
# Profiling behind docs/PERFORMANCE.md (bench.sh has the table's commands): where a compiled training step's time
# and bytes go, and what the GPU fast paths of kernels.py are worth. One GPU, generated data, random weights.
# usage (from the repository root): bash docs/profile.sh [bytes|graphs|fastpaths] ...   (default: all three)
#   bytes      GB that each compiled graph's Inductor kernels read and write per step
#   graphs     ms of GPU kernels per step, grouped by the graph that launched them, and the largest kernels
#   fastpaths  JiT-B/16 batch 128 and SiT-B/2 batch 256 trained with kernels.py's fast paths and without, twice
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
R="--encoder dinov2-vit-b --encoder-weights random --irepa --num-generated 1024 --image-size 256"
run() { echo "+ $*"; "$@" 2>&1 | grep -E "BENCH|img/s|GiB|rel|Error|error" ; }
for what in "${@:-bytes graphs fastpaths}"; do for w in $what; do case $w in
  bytes)  # GB that each compiled graph's Inductor kernels read and write per step (encoder forward, network forward,
    # backward); the ms beside them come from timing each kernel alone, not from the step. Slow: stops after 200 s
    for m in "--model SiT-B/2 --vae-weights random --batch-size 256" "--model JiT-B/16 --batch-size 128"; do
      rm -f /tmp/bw.txt; echo "+ $m"
      TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT=/tmp/bw.txt timeout 200 python -c "import sys, torch._inductor.config as c; c.benchmark_harness = False; import train; train.main(sys.argv[1:])" $m $R --bench 1 --compile > /dev/null 2>&1
      grep -A1 SUMMARY /tmp/bw.txt | grep GB | sort -u; done ;;
  graphs)  # ms of GPU kernels per step, grouped by the graph that launched them, and the largest kernels (chrome trace of --bench's profiled steps)
    for m in "--model SiT-B/2 --vae-weights random --batch-size 256" "--model JiT-B/16 --batch-size 128"; do
      echo "+ $m"; python - $m $R --bench 10 --compile 2>&1 <<'PY' | grep -E "BENCH|GRAPH|KERNEL"
import json, sys, torch, train
class Profile(torch.profiler.profile):  # --bench's profiler, keeping its chrome trace
    def stop(self):
        super().stop()
        self.export_chrome_trace("/tmp/graphs.json")
torch.profiler.profile = Profile
train.main(sys.argv[1:])
ev = json.load(open("/tmp/graphs.json"))["traceEvents"]
names = {"Torch-Compiled Region": "encoder forward", "CompiledFunctionBackward": "backward",
         "CompiledFunction": "network forward", "Optimizer.step": "AdamW", "_foreach_lerp_": "EMA"}
regions = []  # (thread, start, end, graph) of the CPU ranges that launch each graph's kernels
for e in ev:
    n = next((n for k, n in names.items() if k in e["name"]), None) if e.get("cat") in ("cpu_op", "user_annotation") else None
    regions += [(e["tid"], e["ts"], e["ts"] + e["dur"], n)] if n and e.get("ph") == "X" else []
launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")}
ms = {}
for k in (e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")):
    l = launch.get(k["args"].get("correlation"))  # the innermost range around the launch names the graph
    inside = sorted((b - a, n) for t, a, b, n in regions if l and t == l["tid"] and a <= l["ts"] <= b)
    n = inside[0][1] if inside else "other (input copies, gradient norm)"
    ms[n] = ms.get(n, 0) + k["dur"] / 3e3  # 3 profiled steps, us -> ms
for n, v in sorted(ms.items(), key=lambda x: -x[1]):
    print(f"GRAPH {v:6.1f} ms/step  {n}")
print(f"GRAPH {sum(ms.values()):6.1f} ms/step  all kernels")
per = {}  # the largest kernels by name: ms per step and launches per step
for k in (e for e in ev if e.get("cat") == "kernel"):
    t, n = per.get(k["name"], (0, 0))
    per[k["name"]] = (t + k["dur"] / 3e3, n + 1 / 3)
for n, (t, c) in sorted(per.items(), key=lambda x: -x[1][0])[:25]:
    print(f"KERNEL {t:6.2f} ms/step {c:4.0f}x  {n[:110]}")
PY
    done ;;
  fastpaths)  # the same training step with kernels.enable (train.py calls it through the module) and with it a no-op
    for i in 1 2; do
      for m in "--model JiT-B/16 --batch-size 128" "--model SiT-B/2 --vae-weights random --batch-size 256"; do
        run python train.py $m $R --bench 40 --compile
        run python -c "import sys, kernels; kernels.enable = lambda m: m; import train; train.main(sys.argv[1:])" $m $R --bench 40 --compile
      done; done ;;
  *) echo "unknown mode $w (bytes, graphs, fastpaths)"; exit 2 ;;
esac; done; done
