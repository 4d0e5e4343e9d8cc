"""Ahead-of-time compilation of every Triton kernel of mrrm for a GPU target, without a GPU.

Each kernel file declares `AOT_SPECS`: a list of dicts
    {"name": str, "kernel": <@triton.jit function>, "signature": {arg: "*bf16" | "i32" | "fp32" |
     "constexpr", ...}, "constexprs": {arg: value}, "num_warps": int, "num_stages": int,
     "attrs": optional {(arg_index,): [["tt.divisibility", 16]]}, the alignment hints a runtime
     launch would get, so that the AOT build vectorises and pipelines loads like the real one}
covering the block configurations the GPU path launches. `python -m mrrm.kernels.aot` compiles
them all for sm_90 (Hopper) and prints one line per kernel; it exits non-zero on any failure.

Run it with TRITON_INTERPRET unset: under the interpreter, @triton.jit returns interpreted
functions that cannot be compiled.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

KERNEL_MODULES = ("mrrm.kernels.varlen_attention", "mrrm.kernels.value_head")


def all_specs(only=None):
    specs = []
    for mod_name in KERNEL_MODULES:
        if only and mod_name.rsplit(".", 1)[-1] not in only:
            continue
        mod = importlib.import_module(mod_name)
        for spec in mod.AOT_SPECS:
            specs.append((mod_name.rsplit(".", 1)[-1], spec))
    return specs


def compile_spec(spec, arch=90, warp_size=32):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(spec["kernel"], spec["signature"], constexprs=spec.get("constexprs", {}),
                    attrs=spec.get("attrs"))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 2)}
    return triton.compile(src, target=GPUTarget("cuda", arch, warp_size), options=options)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", nargs="*", default=None, help="kernel modules to compile, e.g. value_head")
    args = ap.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:
        sys.exit("mrrm.kernels.aot: TRITON_INTERPRET is set; unset it to compile for a GPU target")
    failures = 0
    specs = all_specs(args.only)
    for mod, spec in specs:
        t0 = time.perf_counter()
        try:
            k = compile_spec(spec, arch=args.arch)
            ptx = k.asm.get("ptx", "")
            cubin = k.asm.get("cubin", b"")
            mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma" in ptx else "no-mma")
            print(f"OK   {mod}.{spec['name']}: sm_{args.arch}, {len(cubin)} B cubin, {mma}, "
                  f"{time.perf_counter() - t0:.1f}s")
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {mod}.{spec['name']}: {type(e).__name__}: {e}")
    print(f"{len(specs) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
