#!/usr/bin/env bash
# Profiling behind docs/PERFORMANCE.md, on top of `python bench.py train` (one GPU, generated data,
# random weights). usage, from anywhere: bash docs/profile.sh [bytes|graphs|fastpaths] ... (default: all);
# PROFILE_ARGS="bench.py train flags" profiles that one configuration instead of the two below
#   bytes      GB that each compiled graph's Inductor kernels read and write per step (TORCHINDUCTOR_PROFILE;
#              the ms beside them time each kernel alone, not the step; stops after 200 s)
#   graphs     ms of GPU kernels per step, grouped by the graph that launched them, and the largest kernels
#   fastpaths  the step with kernels.py's fast paths and with kernels.enable a no-op, twice
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
MODELS=("--model SiT-B/2 --batch-size 256" "--model JiT-B/16 --batch-size 128")
[ -n "${PROFILE_ARGS:-}" ] && MODELS=("$PROFILE_ARGS")  # e.g. "--model SiT-B/2 --batch-size 32"
for w in ${@:-bytes graphs fastpaths}; do case $w in
  bytes) for m in "${MODELS[@]}"; do
      rm -f /tmp/bw.txt; echo "+ $m"
      TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT=/tmp/bw.txt timeout 200 python -c "import sys, torch._inductor.config as c; c.benchmark_harness = False; import bench; bench.main(sys.argv[1:])" train $m --bench-steps 1 > /dev/null 2>&1
      grep -A1 SUMMARY /tmp/bw.txt | grep GB | sort -u; done ;;
  graphs) for m in "${MODELS[@]}"; do
      echo "+ $m"; python - train $m --bench-steps 10 --profile 2>&1 <<'PY' | grep -E "BENCH|GRAPH|KERNEL"
import json, sys, torch, bench
class Profile(torch.profiler.profile):  # bench.py's profiler, keeping its chrome trace
    def stop(self):
        super().stop()
        self.export_chrome_trace("/tmp/graphs.json")
torch.profiler.profile = Profile
bench.main(sys.argv[1:])
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
  fastpaths) for i in 1 2; do for m in "${MODELS[@]}"; do
      python bench.py train $m 2>&1 | grep BENCH
      python -c "import sys, kernels; kernels.enable = lambda m: m; import bench; bench.main(sys.argv[1:])" train $m 2>&1 | grep BENCH
    done; done ;;
  *) echo "unknown mode $w (bytes, graphs, fastpaths)"; exit 2 ;;
esac; done
