"""Issue 23's fault part on the one GPU lent: a training step of four attention layers on the H200 with a
stuck-at bit in one head (a defective unit: every call), the monitor's global verdict, and its replay on
the GPU and then on the CPU ("device"); a one-off flip ("transient"); the time of Monitor.step().
    PYTHONPATH=. python3 docs/data/monitor-gpu-h200-2026-12-03/monitor_gpu.py torch|jax"""
import os, sys, time, warnings
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
warnings.filterwarnings("ignore")
import numpy as np
from ftattn_spec import Fault
from ftattn_spec import fault_models as fm
T0 = time.time()
def say(*a): print(f"[{time.time()-T0:4.0f}s]", *a, flush=True)
B, N, T, H, L = (2, 16, 2048, 128, 4) if len(sys.argv) < 3 else (2, 8, 64, 16, 4)
STUCK = fm.stuck_head("probs", 1, 5, bit=29, to=0)
FLIP = [Fault("probs", (0, 3, T // 3, T // 2), bit=30)]

if sys.argv[1] == "torch":
    import torch, torch.distributed as dist
    import ftattn_torch
    from ftattn_torch import monitor
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="tcp://127.0.0.1:29535", rank=0, world_size=1)
    say("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = [torch.randn(B, N, T, H, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu") for _ in range(3)]
    g = torch.randn(B, N, T, H, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")

    def step(device=None, fault_layer=None, fault=None):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        x = [t.to(dev, dt).requires_grad_() for t in base]
        q, k, v = x
        out = q
        for i in range(L):
            out, _ = ftattn_torch.attention(out, k, v, site=f"layer {i}", fault=fault if i == fault_layer else None)
        torch.autograd.grad(out, x, g.to(dev, dt))
        if dev == "cuda":
            torch.cuda.synchronize()

    mon = monitor.Monitor()
    step(); mon.step()
    ts = []
    for _ in range(10):
        step(); t = time.perf_counter(); v = mon.step(); ts.append(time.perf_counter() - t)
    say(f"clean steps: {v.summary()}; Monitor.step() median {np.median(ts)*1e3:.3f} ms (world size 1, NCCL group)")
    step(fault_layer=2, fault=STUCK)
    v = mon.step()
    say("bit 29 stuck at 0 in head (b=1, n=5) of layer 2 every call:", v.summary().replace("\n", " | "))
    c = mon.replay(lambda device: step(device, 2, STUCK if device is None else None), other="cpu")
    say("replay on the GPU, then the CPU (the fault follows the GPU):", c.kind,
        "| same device:", c.same_device.detected, "| other:", c.other_device.detected)
    step(fault_layer=2, fault=STUCK); mon.step()
    c = mon.replay(lambda device: step(device, 2, STUCK), other="cpu")
    say("the same fault on both (the data's):", c.kind)
    step(fault_layer=1, fault=FLIP)
    v = mon.step()
    say("one flip in layer 1:", v.summary().replace("\n", " | "))
    say("replay:", mon.replay(lambda device: step(device)).kind)
    dist.destroy_process_group()
else:
    import jax, jax.numpy as jnp
    import ftattn_jax
    from ftattn_jax import monitor
    say("jax", jax.__version__, jax.devices()[0].device_kind)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    base = [jax.random.normal(x, (B, T, N, H), jnp.bfloat16) for x in ks[:3]]
    g = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)

    def loss(q, k, v, g, f1, f2):
        out = q
        for i in range(L):
            out, _ = ftattn_jax.attention(out, k, v, site=f"layer {i}", fault=f1 if i == 1 else (f2 if i == 2 else None))
        return jnp.sum(out.astype(jnp.float32) * g)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def step(device=None, f1=None, f2=None):
        if device is None:
            x = base
        else:
            x = [jax.device_put(t.astype(jnp.float32), device) for t in base]
        gg = g if device is None else jax.device_put(g, device)
        jax.block_until_ready(grad(*x, gg, f1, f2))

    mon = monitor.Monitor()
    step(); mon.step()
    ts = []
    for _ in range(10):
        step(); t = time.perf_counter(); v = mon.step(); ts.append(time.perf_counter() - t)
    say(f"clean steps: {v.summary()}; Monitor.step() median {np.median(ts)*1e3:.3f} ms")
    step(f2=STUCK)
    v = mon.step()
    say("bit 29 stuck at 0 in head (b=1, n=5) of layer 2 every call:", v.summary().replace("\n", " | "))
    cpu = jax.devices("cpu")[0]
    c = mon.replay(lambda device: step(device, None, STUCK if device is None else None), other=cpu)
    say("replay on the GPU, then the CPU (the fault follows the GPU):", c.kind,
        "| same device:", c.same_device.detected, "| other:", c.other_device.detected)
    step(f2=STUCK); mon.step()
    say("the same fault on both (the data's):", mon.replay(lambda device: step(device, None, STUCK), other=cpu).kind)
    step(f1=FLIP)
    v = mon.step()
    say("one flip in layer 1:", v.summary().replace("\n", " | "))
    say("replay:", mon.replay(lambda device: step(device)).kind)
