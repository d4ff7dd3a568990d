#!/usr/bin/env bash
# GPU smoke run for normfold (`make test-gpu`): every GPU path of issue 14 once, on one GPU, in < 5 min.
# Prints PASS/FAIL per path (details in $W/<step>.log|json|err) and exits with the number of failures.
# Without a GPU it fails at once (exit 3): a smoke run that cannot run must never look green.
# Needs the venv (make setup) plus onnxruntime-gpu and `pip install 'normfold[tensorrt]'` (TensorRT 10.x).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NF=${NF:-.venv/bin/normfold}
TO=${TO:-180}
W=$(mktemp -d -t normfold-gpu-smoke.XXXX)
export TMPDIR=$W # a fresh normfold-cache (TensorRT engines, converted models) under $W
FAILS=0

if ! nvidia-smi -L >"$W/gpu.log" 2>&1; then
  echo "FAIL gpu: no NVIDIA GPU visible (nvidia-smi -L: $(head -c 200 "$W/gpu.log" | tr '\n' ' ')); nothing was tested"
  exit 3
fi
echo "GPU: $(head -1 "$W/gpu.log")"

nf() { timeout "$TO" "$NF" "$@"; }
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; FAILS=$((FAILS + 1)); }
step() { # step NAME CMD...: PASS when CMD exits 0
  local n=$1; shift
  if "$@" >"$W/$n.log" 2>&1; then pass "$n"; else fail "$n" "rc=$? $(grep -v '^\s*$' "$W/$n.log" | tail -3 | tr '\n' ' ' | cut -c1-300)"; fi
}
cmp_json() { # cmp_json TAG BACKEND ARGS...: compare --json; stdout must be exactly one JSON object
  local tag=$1 be=$2; shift 2
  nf compare "$@" --backend "$be" --json >"$W/$tag-$be.json" 2>"$W/$tag-$be.err"
  local verdict
  verdict=$("$PY" - "$W/$tag-$be.json" "$be" <<'PY'
import json, sys
path, be = sys.argv[1:]
text = open(path).read()
try:
    report = json.loads(text)
except ValueError as e:
    sys.exit(print(f"stdout is not one JSON object ({e}): {text[:160]!r}"))
b = report["backends"][be]
worst = max((o.get("max_abs") or 0.0) for o in b["outputs"].values()) if b.get("outputs") else None
print(f"{'ok' if b['passed'] else 'no'} {b['status']} max_abs={worst} {str(b.get('reason', ''))[:160]}")
PY
  )
  case $verdict in
    ok*) pass "$tag $be (${verdict#ok })" ;;
    *) fail "$tag $be" "${verdict#no } $(tail -2 "$W/$tag-$be.err" | tr '\n' ' ' | cut -c1-200)" ;;
  esac
}

# 1. the three probes, through `backends --json` (stdout must parse)
step probes "$PY" - "$NF" <<'PY'
import json, subprocess, sys
out = subprocess.run([sys.argv[1], "backends", "--json"], capture_output=True, text=True).stdout
rows = {b["name"]: b for b in json.loads(out)["backends"]}
bad = [f"{n}: {rows[n]['reason']}" for n in ("ort-cuda", "ort-trt", "trt") if not rows[n]["available"]]
print("\n".join(bad) or "ort-cuda, ort-trt and trt available")
sys.exit(len(bad))
PY

# 2. exports: static, dynamic batch, a GroupNorm model, and a model with a dynamic sequence axis
step export-r nf export zoo:resnet_basic -o "$W/r.onnx"
step export-rd nf export zoo:resnet_basic -o "$W/rd.onnx" --dynamic-batch
step export-ld nf export zoo:lenet_bn -o "$W/ld.onnx" --dynamic-batch
step export-u nf export zoo:unet_resblock -o "$W/u.onnx"
step make-seq "$PY" - "$W/seq.onnx" <<'PY'
import sys, numpy as np, onnx
from onnx import TensorProto as T, helper as h, numpy_helper as nh
s = nh.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "s")
g = h.make_graph([h.make_node("LayerNormalization", ["x", "s"], ["n"]), h.make_node("Relu", ["n"], ["y"])], "seq",
                 [h.make_tensor_value_info("x", T.FLOAT, ["N", "T", 8])], [h.make_tensor_value_info("y", T.FLOAT, ["N", "T", 8])], [s])
onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10), sys.argv[1])
PY

# 3. fp32 / tf32 / fp16 compares on each GPU backend (ort-trt's fp32 is TF32: claimed at tf32 tolerances)
for be in ort-cuda trt; do cmp_json fp32-resnet "$be" zoo:resnet_basic "$W/r.onnx"; done
for be in ort-cuda ort-trt trt; do cmp_json tf32-resnet "$be" zoo:resnet_basic "$W/r.onnx" --precision tf32; done
NVIDIA_TF32_OVERRIDE=0 cmp_json fp32-no-tf32-resnet ort-trt zoo:resnet_basic "$W/r.onnx" # strict fp32 on ort-trt
for be in ort-cuda ort-trt trt; do cmp_json fp16-unet "$be" zoo:unet_resblock "$W/u.onnx" --precision fp16; done

# 4. a dynamic-batch export fed batch 2 (lenet_bn's example input), no declared batch sizes
for be in ort-trt trt; do cmp_json dynbatch2-lenet "$be" zoo:lenet_bn "$W/ld.onnx"; done

# 5. bench: dynamic sequence axis sized by --input; CUDA graphs; JSON written and parsed
step bench-seq nf bench "$W/seq.onnx" --backend ort-cuda,ort-trt,trt --input x:1x7x8 --batch 1,4 --warmup 3 --iters 20 --json "$W/bench-seq.json"
step bench-json "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(len(r["results"]), "rows")' "$W/bench-seq.json"
step bench-cudagraph nf bench "$W/rd.onnx" --backend ort-cuda,ort-trt --batch 4 --cuda-graph --warmup 3 --iters 20

# 6. convert --auto: fp16 (fp32 I/O) and bf16 with low-precision I/O
step auto-fp16 nf convert "$W/u.onnx" -o "$W/u16.onnx" --auto ort-cuda --keep-io-types --json
cmp_json auto-fp16-result ort-cuda zoo:unet_resblock "$W/u16.onnx" --precision fp16
step auto-bf16 nf convert "$W/u.onnx" -o "$W/ub.onnx" --precision bf16 --auto ort-cuda --json

# 7. custom-norm plugins with eps = 0.5 against the native ops, on trt and ort-trt
step custom-norm-eps "$PY" - "$W" <<'PY'
import sys, numpy as np, onnx
from onnx import TensorProto as T, helper as h, numpy_helper as nh
from normfold.exporter.custom_norms import to_custom_norms
from normfold.runtime import SessionOptions, get_backend
w, c, r = sys.argv[1], 8, np.random.default_rng(0)
p = lambda n, k: nh.from_array(r.uniform(0.5, 1.5, k).astype(np.float32), n)
nodes = [h.make_node("GroupNormalization", ["x", "s", "b"], ["g"], num_groups=2, epsilon=0.5),
         h.make_node("InstanceNormalization", ["g", "s", "b"], ["i"], epsilon=0.5),
         h.make_node("LayerNormalization", ["i", "ls", "lb"], ["y"], epsilon=0.5)]
vi = lambda n: h.make_tensor_value_info(n, T.FLOAT, [1, c, 4, 4])
g = h.make_graph(nodes, "g", [vi("x")], [vi("y")], [p("s", c), p("b", c), p("ls", 4), p("lb", 4)])
onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10), f"{w}/n.onnx")
print(to_custom_norms(f"{w}/n.onnx", f"{w}/nc.onnx").replaced)
x = {"x": (0.5 * r.standard_normal((1, c, 4, 4))).astype(np.float32)}
with get_backend("ort-cpu").load(f"{w}/n.onnx") as run:
    ref = run.infer(x)["y"]
bad = 0
for be in ("ort-cpu", "trt", "ort-trt"):
    with get_backend(be).load(f"{w}/nc.onnx", SessionOptions(cache_dir=__import__("pathlib").Path(w) / "c")) as run:
        d = float(np.abs(run.infer(x)["y"] - ref).max())
    print(f"{be}: custom-norm max|diff| vs native = {d:.3e}")
    bad |= not d < 1e-3
sys.exit(bad)
PY

# 8. Triton: --fp16 carries the verified ort-trt options; a built plan's batch profile spans 1..8
step triton-fp16 nf triton "$W/rd.onnx" --repo "$W/models" --name r16 --max-batch 8 --dynamic-batching --fp16
step triton-fp16-params grep -q 'key: "trt_layer_norm_fp32_fallback" value: "1"' "$W/models/r16/config.pbtxt"
step triton-plan nf triton "$W/rd.onnx" --repo "$W/models" --name rplan --platform tensorrt --max-batch 8 --fp16
step plan-profile "$PY" -c 'import sys, tensorrt as t
e = t.Runtime(t.Logger()).deserialize_cuda_engine(open(sys.argv[1], "rb").read())
n = e.get_tensor_name(0); p = e.get_tensor_profile_shape(n, 0); print(n, p); sys.exit(int(p[0][0] != 1 or p[2][0] < 8))' "$W/models/rplan/1/model.plan"

# 9. the gpu-marked tests
step pytest-gpu timeout 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider -p no:xdist \
  tests/runtime/test_gpu_backends.py tests/bench/test_bench_harness.py

echo "logs: $W"
echo "$FAILS failure(s)"
exit "$FAILS"
