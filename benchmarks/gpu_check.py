"""GPU check behind benchmarks/h100_gpu_check.txt (run 2): eager vs torch.compile LoRA gradients.

Run on a CUDA machine from the repository root: ``PYTHONPATH=. python benchmarks/gpu_check.py``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lora.lora_transformer import LoRATransformer

dev = torch.device("cuda")
V = 256
idx = torch.randint(0, V, (8, 128), device=dev)
tgt = torch.roll(idx, 1, dims=1)


def grads(compiled: bool, general: bool) -> dict:
    torch.manual_seed(0)
    m = LoRATransformer(V, 256, 4, 4, max_seq_len=128, dropout=0.0, lora_targets=("q", "k", "v", "o"))
    m.configure_lora_training()
    m = m.to(dev)
    g = torch.Generator(device="cpu").manual_seed(5)
    for _, layer in m.lora_layers():
        layer.lora_B.data.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        if general:
            layer.lora_dropout = nn.Dropout(0.0)  # forces the plain-autograd path
    run = torch.compile(m) if compiled else m
    F.cross_entropy(run(idx).reshape(-1, V), tgt.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


ref = grads(False, True)
for compiled, general in ((False, False), (True, False), (True, True)):
    got = grads(compiled, general)
    worst = {}
    for n, g in got.items():
        key = n.rsplit(".", 1)[-1]
        worst[key] = max(worst.get(key, 0.0), ((g - ref[n]).abs().max() / ref[n].abs().max()).item())
    print(f"compiled={compiled} general_path={general}: max rel diff vs eager general {worst}")
