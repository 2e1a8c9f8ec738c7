"""The machine code of pyvae's CUDA kernels, read from a built binary without a GPU.

For each kernel (one line per template instance) of the chosen architecture: registers, stack, local
memory (spills), shared memory, the 128-bit global loads and stores (LDG.E.128*, STG.E.128), the other
global loads, the local-memory traffic (LDL/STL: spills and arrays that did not fit registers), block
barriers (BAR), warp shuffles (SHFL), special-function instructions (MUFU) and the instruction count
(static counts in the code, not executed ones). Then the checks the CUDA work relies on: the float32 row kernels' vector variants
load with LDG.E.128, and every (family, dtype) the binding accepts on CUDA has kernels in the binary.

    python bench/cuda_sass.py                      # build/cuda-check's module, sm_90
    python bench/cuda_sass.py path/to/_C.so --arch sm_80 --filter elbo
    python bench/cuda_sass.py --check              # exit 1 when a check fails

Needs cuobjdump and nvdisasm: on PATH, in /usr/local/cuda/bin, or from the pip wheels
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm (which install them under nvidia/cu13/bin).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_OF = {"float": "float32", "double": "float64", "__half": "float16", "__nv_bfloat16": "bfloat16"}
FAMILY_OF = {"rowwise_fwd_kernel": "rowwise", "rowwise_bwd_kernel": "rowwise", "elbo_fwd_kernel": "rowwise",
             "elbo_bwd_kernel": "rowwise", "reparam_fwd_kernel": "reparameterize",
             "reparam_bwd_kernel": "reparameterize", "bias_act_kernel": "linear", "act_bwd_kernel": "linear",
             "colsum_kernel": "linear"}
FWD_OPS = {"0": "bernoulli", "1": "kl_std", "2": "kl", "3": "gaussian"}


def find_tool(name: str) -> str:
    """``name`` on PATH, in /usr/local/cuda/bin, or in a pip wheel's nvidia/cu*/bin."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if found:
        return found
    for base in sys.path:
        for path in sorted(glob.glob(os.path.join(base or ".", "nvidia", "cu*", "bin", name))):
            if os.access(path, os.X_OK):
                return path
    raise SystemExit(f"cuda_sass: {name} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, "
                     "or put the CUDA toolkit's bin on PATH)")


def default_binary() -> str:
    hits = sorted(glob.glob(os.path.join(ROOT, "build", "cuda-check", "_C*.so")))
    if not hits:
        raise SystemExit("cuda_sass: no build/cuda-check/_C*.so; run the CUDA compile check of CONTRIBUTING.md "
                         "or pass the binary")
    return hits[0]


def run(tool: str, args, env) -> str:
    return subprocess.run([tool, *args], check=True, capture_output=True, text=True, env=env).stdout


def demangle(names):
    if not names:
        return {}
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short(demangled: str) -> str:
    """``rowwise_fwd_kernel<bernoulli, float, G=32, vec>`` from the demangled name."""
    s = re.sub(r"pyvae::cuda::(\(anonymous namespace\)::)?", "", demangled)
    s = re.sub(r"\((pyvae::)?\w+Params.*$", "", s).replace("void ", "").strip()
    s = re.sub(r"\(Fwd\)(\d)", lambda m: FWD_OPS[m.group(1)], s)
    s = re.sub(r"\(ops::Act\)(\d)", r"act\1", s)
    s = s.replace(", true>", ", vec>").replace(", false>", ", scalar>")
    return s


def parse_resources(text: str):
    res, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return res


def parse_sass(text: str):
    counts, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            counts[name] = defaultdict(int)
            continue
        if not name:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(2)
        c = counts[name]
        c["instructions"] += 1
        if op.startswith("LDG.E.128"):
            c["ldg128"] += 1
        elif op.startswith("LDG"):
            c["ldg_other"] += 1
        elif op.startswith("STG.E.128"):
            c["stg128"] += 1
        elif op.startswith(("LDL", "STL")):
            c["local"] += 1
        elif op.startswith("MUFU"):
            c["mufu"] += 1
        elif op.startswith("BAR"):
            c["bar"] += 1
        elif op.startswith("SHFL"):
            c["shfl"] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary", nargs="?", help="a built _C*.so or .o (default: build/cuda-check/_C*.so)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="", help="only kernels whose short name contains this")
    ap.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    args = ap.parse_args(argv)
    binary = args.binary or default_binary()
    cuobjdump = find_tool("cuobjdump")
    nvdisasm = find_tool("nvdisasm")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    res = parse_resources(run(cuobjdump, ["-res-usage", "-arch", args.arch, binary], env))
    sass = parse_sass(run(cuobjdump, ["-sass", "-arch", args.arch, binary], env))
    names = sorted(set(res) | set(sass))
    dm = demangle(names)
    print(f"binary: {os.path.relpath(binary, ROOT)}  arch: {args.arch}  kernels: {len(names)}  "
          f"cuobjdump: {run(cuobjdump, ['--version'], env).strip().splitlines()[-1]}")
    hdr = f"{'kernel':<58} {'reg':>4} {'stack':>5} {'local':>5} {'shmem':>5} {'LDG128':>6} {'LDG':>4} " \
          f"{'STG128':>6} {'LDL/STL':>7} {'BAR':>3} {'SHFL':>4} {'MUFU':>4} {'instr':>5}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for n in names:
        s = short(dm.get(n, n))
        r = res.get(n, {})
        c = sass.get(n, defaultdict(int))
        rows.append((s, r, c, dm.get(n, n)))
    for s, r, c, _ in sorted(rows):
        if args.filter and args.filter not in s:
            continue
        print(f"{s[:58]:<58} {r.get('REG', 0):>4} {r.get('STACK', 0):>5} {r.get('LOCAL', 0):>5} "
              f"{r.get('SHARED', 0):>5} {c['ldg128']:>6} {c['ldg_other']:>4} {c['stg128']:>6} {c['local']:>7} "
              f"{c['bar']:>3} {c['shfl']:>4} {c['mufu']:>4} {c['instructions']:>5}")

    failures = []
    # 1. float32 vector row kernels load 16 bytes at a time.
    vec32 = [(s, c) for s, r, c, d in rows if re.match(r"(rowwise|elbo)_(fwd|bwd)_kernel<", s)
             and re.search(r"[<,] ?float,", s) and s.endswith("vec>")]
    for s, c in vec32:
        if c["ldg128"] == 0:
            failures.append(f"{s}: no LDG.E.128")
    print(f"\ncheck: float32 vector row kernels with LDG.E.128: {sum(c['ldg128'] > 0 for _, c in vec32)}"
          f"/{len(vec32)}")
    # 2. every family has kernels for every dtype the binding accepts on CUDA.
    seen = defaultdict(set)
    for s, r, c, d in rows:
        base = s.split("<")[0]
        fam = FAMILY_OF.get(base)
        if fam:
            for cpp, name in DTYPE_OF.items():
                if re.search(r"[<, ]" + re.escape(cpp) + r"[,>]", d):
                    seen[fam].add(name)
    accepted = {"rowwise": {"float32", "float64", "float16", "bfloat16"}}
    try:
        sys.path.insert(0, ROOT)
        from pyvae import _C  # the source tree's or the installed module: its tables, not this binary's

        accepted = {"rowwise": set(_C.rowwise_dtypes["cuda"]), "reparameterize": set(_C.rowwise_dtypes["cuda"]),
                    "linear": set(_C.linear_dtypes["cuda"])}
    except ImportError:
        print("check: pyvae._C not importable; checking the row family against all four dtypes")
    for fam, want in accepted.items():
        missing = sorted(want - seen[fam])
        print(f"check: {fam}: kernels for {sorted(seen[fam])}" + (f"; MISSING {missing}" if missing else ""))
        if missing:
            failures.append(f"{fam}: no kernels for {missing}")
    spills = [(s, r) for s, r, c, d in rows if r.get("LOCAL", 0) or c["local"]]
    print(f"check: kernels with local memory (spills or stack arrays): {len(spills)}"
          + "".join(f"\n  {s}: LOCAL {r.get('LOCAL', 0)} STACK {r.get('STACK', 0)}" for s, r in spills))
    for f in failures:
        print("FAIL:", f)
    return 1 if (failures and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
