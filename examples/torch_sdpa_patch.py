"""``aule_kp`` as a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

Shows the three ways in: calling ``aule_kp.scaled_dot_product_attention`` directly, patching torch
for a block (``with aule_kp.enabled():``) and for the process (``aule_kp.install()``), including
autograd. Run: ``python examples/torch_sdpa_patch.py [--backend cpu|vulkan|auto]``; prints
``torch_sdpa_patch: OK`` when every result matches torch's own SDPA.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch
import torch.nn.functional as F

import aule_kp


class TinySelfAttention(torch.nn.Module):
    """A model that calls F.scaled_dot_product_attention, as most torch models do."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # looked up at call time: patchable
        return self.out(o.transpose(1, 2).reshape(b, n, c))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="None (by device), auto, vulkan, triton or cpu")
    args = parser.parse_args()
    backend: Optional[str] = args.backend
    torch.manual_seed(0)
    original = F.scaled_dot_product_attention
    failures = 0

    def report(what: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5) -> None:
        nonlocal failures
        err = (got - want).abs().max().item()
        ok = err <= atol
        failures += not ok
        print(f"  {what:<42} max |diff| vs torch {err:.1e}  {'ok' if ok else 'FAIL'}")

    # 1. Direct call, GQA (8 query heads over 2 KV heads) with a boolean mask, torch's semantics.
    q, k, v = torch.randn(2, 8, 32, 64), torch.randn(2, 2, 48, 64), torch.randn(2, 2, 48, 64)
    mask = torch.rand(2, 1, 32, 48) > 0.2
    with aule_kp.enabled(backend):
        got = aule_kp.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    report("direct call (GQA + bool mask)", got, original(q, k, v, attn_mask=mask, enable_gqa=True))

    # 2. A whole model under a patched torch, only inside the block.
    model = TinySelfAttention().eval()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        want = model(x)
        with aule_kp.enabled(backend):
            assert F.scaled_dot_product_attention is not original  # patched here
            got = model(x)
    assert F.scaled_dot_product_attention is original  # and restored after
    report("model under `with aule_kp.enabled()`", got, want)

    # 3. Process-wide patch with gradients: aule_kp's backward kernel against torch's.
    xg = x.clone().requires_grad_(True)
    model(xg).square().mean().backward()
    want_grad = xg.grad.clone()
    aule_kp.install(backend)
    try:
        xg.grad = None
        model(xg).square().mean().backward()
    finally:
        aule_kp.uninstall()
    report("gradient after aule_kp.install()", xg.grad, want_grad, atol=1e-5)

    print("torch_sdpa_patch: OK" if not failures else f"torch_sdpa_patch: {failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
