import time, cProfile, pstats, statistics, numpy as np
import aule_kp
from aule_kp.vulkan import plan as planmod, hostcopy
from aule_kp import nonfinite, call
timers = {}
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); timers.setdefault(name, []).append(time.perf_counter() - t); return r
    setattr(mod, name, g)
wrap(planmod, "forward_plan"); wrap(planmod, "enforce"); wrap(call, "prepare")
orig = planmod.Plan.run_checked
def rc(self, *a):
    t = time.perf_counter(); r = orig(self, *a); timers.setdefault("run_checked", []).append(time.perf_counter() - t)
    timers.setdefault("plan_info", []).append((self.pipelined, len(self.chunks), type(self).__name__)); return r
planmod.Plan.run_checked = rc
origcb = hostcopy.copy_bytes
rng = np.random.default_rng(0)
for (H, S, D) in [(32, 8192, 128), (32, 8192, 64)]:
    q, k, v = (rng.standard_normal((1, H, S, D), dtype=np.float32).astype(np.float16) for _ in range(3))
    f = lambda: aule_kp.flash_attention(q, k, v, backend="vulkan")
    f(); timers.clear()
    ts = []
    for _ in range(7):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    print(f"H{H} S{S} D{D}: whole call median {statistics.median(ts)*1e3:.2f} ms; parts (median ms):",
          {k: round(statistics.median(v) * 1e3, 2) for k, v in timers.items() if k != "plan_info"}, timers.get("plan_info", [None])[-1])
    pr = cProfile.Profile(); pr.enable(); f(); pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
