"""Check mrrm's flash-linear-attention path (Qwen3.5's Gated DeltaNet) on the CPU, in Triton's interpreter.

    python scripts/check_fla_interpreter.py --fla-src DIR     # DIR: an unpacked fla-core 0.6.0 wheel

fla's kernels are CUDA-first; under TRITON_INTERPRET=1 they run after two changes that this script
makes without touching any installed package: (1) Triton's autotuner cannot benchmark in the
interpreter, so every autotuner takes its first config (patched at runtime in the child process);
(2) one kernel calls `.to(tl.int64)` on a loop index, a Python int in the interpreter: a temporary
copy of DIR gets `tl.cast(i_t, tl.int64)` instead. The child compares backend="fla" with the torch
path (mrrm.ops.linear_attention) on an independent-mode stream (prefixes forked to several
responses, a prefix and a response longer than one 64-token chunk): outputs and the gradients of
every input, the prefix's through the forked states. Prints the largest differences; exits 1 past
the tolerance. On a CUDA machine, tests/model/test_qwen35.py::test_fla_backend_matches_torch_values_and_gradients
checks the same natively.

To get DIR:  pip download fla-core==0.6.0 --no-deps -d /tmp/fla && unzip /tmp/fla/*.whl -d DIR
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

TOLERANCE = 1e-5

CHILD = r'''
import sys
import torch
from triton.runtime import autotuner


def first_config(self, *args, **kwargs):  # the interpreter cannot time configs: take the first
    self.nargs = dict(zip(self.arg_names, args))
    config = self.configs[0]
    self.best_config = config
    if config.pre_hook is not None:
        config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
    return self.fn.run(*args, **kwargs, **config.all_kwargs())


autotuner.Autotuner.run = first_config

from mrrm.ops import linear_attention as la  # noqa: E402
from mrrm.ops._dispatch import fla_available  # noqa: E402
from mrrm.data.packing import SampleLayout, pack  # noqa: E402

assert fla_available(), "fla did not import from the patched copy"
layouts = [SampleLayout(prefix_ids=list(range(P)), response_ids=[[1] * r for r in rs], separator_ids=[9])
           for P, rs in ((5, [3, 1, 4]), (70, [66, 2]), (3, [7]))]
pb = pack(layouts, "independent")
plan = la.recurrent_plan(pb.cu_seqlens, pb.mask, pb.segment_ids)
T = pb.num_tokens
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
inputs = dict(q=r(T, 2, 16), k=r(T, 2, 16), v=r(T, 4, 16), g=-torch.nn.functional.softplus(r(T, 4)),
              beta=torch.sigmoid(r(T, 4)), x=r(T, 24), weight=r(24, 4) * 0.5, bias=r(24) * 0.1)
results = {}
for backend in ("torch", "fla"):
    xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    conv = la.causal_conv1d_varlen(xs["x"], xs["weight"], xs["bias"], plan, backend=backend)
    out = la.gated_delta_rule_varlen(xs["q"], xs["k"], xs["v"], xs["g"], xs["beta"], plan, backend=backend)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    projc = torch.randn(conv.shape, generator=torch.Generator().manual_seed(2))
    ((out * proj).sum() + (conv * projc).sum()).backward()
    results[backend] = {"conv": conv.detach(), "out": out.detach(), **{f"grad {k}": v.grad for k, v in xs.items()}}
worst = 0.0
for key, want in results["torch"].items():
    got = results["fla"][key]
    diff = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
    worst = max(worst, diff)
    print(f"{key:12s} max |fla - torch| / max(1, |torch|) = {diff:.2e}")
sys.exit(0 if worst <= float(sys.argv[1]) else 1)
'''


def patched_copy(src: str, dest: str) -> int:
    """Copy the fla tree to dest with `i_t.to(tl.int64)` -> `tl.cast(i_t, tl.int64)`; returns the files changed."""
    if not os.path.isdir(os.path.join(src, "fla")):
        raise SystemExit(f"--fla-src {src!r}: no fla/ package inside (unpack the fla-core 0.6.0 wheel there)")
    shutil.copytree(os.path.join(src, "fla"), os.path.join(dest, "fla"))
    changed = 0
    for root, _, files in os.walk(os.path.join(dest, "fla")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path) as f:
                text = f.read()
            if "i_t.to(tl.int64)" in text:
                with open(path, "w") as f:
                    f.write(text.replace("i_t.to(tl.int64)", "tl.cast(i_t, tl.int64)"))
                changed += 1
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fla-src", required=True, help="an unpacked fla-core 0.6.0 wheel (holds fla/)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    a = p.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        changed = patched_copy(a.fla_src, tmp)
        print(f"patched {changed} file(s) of a copy of {a.fla_src}")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([tmp, repo]))
        # run outside the repository root: its folders must not shadow installed packages
        return subprocess.run([sys.executable, "-c", CHILD, str(a.tolerance)], env=env, cwd=tmp).returncode


if __name__ == "__main__":
    raise SystemExit(main())
