"""LoRA fused into the UNet's weights against LoRA kept as peft adapters: what each costs.

For each way (the UNet of ``--preset``, random weights, with a random LoRA of ``--rank`` on its
attention projections and resnet convolutions, at ``--size``):

- ms per UNet call with the LoRA active (and the plain UNet's, the floor), batch ``--batch``;
- ms per weight change: livediff's re-fuse (``FusedLoras.apply``: restore the touched weights,
  add the new sum) against diffusers' ``set_adapters``;
- under ``torch.compile`` (``--compile-backend``, eager by default: dynamo's guards and
  recompiles without code generation), how many graphs dynamo compiles when the weight changes
  (its ``unique_graphs`` counter).

Every timing is the median of ``--iterations`` calls, the best of ``--repeats`` alternating
runs. It prints a table and writes ``benchmarks/results/lora-<preset>-<size>-<device>.json``.

    python benchmarks/lora.py                      # CPU, tiny model, 128 px, ~20 s
    python benchmarks/lora.py --preset sd-turbo --size 512    # a GPU: float16, synchronized
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from common import Column, Table, machine, median, save_json

from livediff.testing.lora import write_lora
from livediff.testing.models import build_components, preset
from livediff.transforms.diffusion.bundle import ModelBundle, prepare
from livediff.transforms.diffusion.lora import FusedLoras, read_lora

WEIGHTS = (0.5, 1.0)
WEIGHT_FILE = "pytorch_lora_weights.safetensors"


def timed_ms(call: Callable[[], Any], iterations: int, device: torch.device) -> float:
    """Median ms of ``call`` over ``iterations`` runs (after one untimed); on a GPU each run
    is timed to the end of its kernels."""
    call()
    times = []
    for _ in range(iterations):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    return median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_of(device: torch.device) -> torch.dtype:
    """What the worker runs the UNet in: float16 on a GPU, float32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def build_unet(args: argparse.Namespace) -> Any:
    """The preset's UNet, prepared as the worker prepares it (eval, SDPA, channels_last)."""
    parts = build_components(args.preset, device=args.device.type)
    bundle = ModelBundle(
        parts["unet"], parts["taesd"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"]
    )
    return prepare(bundle, args.device, dtype_of(args.device)).unet


def inputs(unet: Any, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    latent, place = args.size // 8, {"device": args.device, "dtype": dtype_of(args.device)}
    x_t = torch.randn(args.batch, unet.config.in_channels, latent, latent, **place)
    embeddings = torch.randn(args.batch, 77, unet.config.cross_attention_dim, **place)
    return (
        x_t.contiguous(memory_format=torch.channels_last),
        torch.full((args.batch,), 499, device=args.device),
        embeddings,
    )


class Ways:
    """The plain UNet, one with the LoRA fused and one with it as a peft adapter."""

    def __init__(self, args: argparse.Namespace, lora_folder: Path) -> None:
        self.plain = build_unet(args)
        self.fused_unet = copy.deepcopy(self.plain)
        self.adapter_unet = copy.deepcopy(self.plain)
        lora = read_lora(lora_folder / WEIGHT_FILE, device=args.device, dtype=dtype_of(args.device))
        self.fused = FusedLoras(self.fused_unet)
        self.set_fused = lambda weight: self.fused.apply([(lora, weight)])
        self.set_fused(WEIGHTS[0])
        self.adapter_unet.load_lora_adapter(
            str(lora_folder), prefix="unet", adapter_name="style", weight_name=WEIGHT_FILE
        )
        self.set_adapter = lambda weight: self.adapter_unet.set_adapters(["style"], [weight])
        self.set_adapter(WEIGHTS[0])


def forward(unet: Any, x: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    return lambda: unet(x[0], x[1], encoder_hidden_states=x[2], return_dict=False)


def alternating(setter: Callable[[float], Any]) -> Callable[[], None]:
    """A weight change each call, back and forth."""
    state = {"index": 0}

    def change() -> None:
        state["index"] += 1
        setter(WEIGHTS[state["index"] % 2])

    return change


@torch.inference_mode()
def measure(ways: Ways, args: argparse.Namespace, turn: int) -> dict[str, float]:
    """One run of every measurement, the order rotated by ``turn`` (a shared machine's
    disturbances then fall on each in turn)."""
    x = inputs(ways.plain, args)
    calls = {
        "plain_unet_ms": forward(ways.plain, x),
        "fused_unet_ms": forward(ways.fused_unet, x),
        "adapter_unet_ms": forward(ways.adapter_unet, x),
        "fused_change_ms": alternating(ways.set_fused),
        "adapter_change_ms": alternating(ways.set_adapter),
    }
    names = list(calls)
    names = names[turn % len(names) :] + names[: turn % len(names)]
    return {name: timed_ms(calls[name], args.iterations, args.device) for name in names}


def recompiles(unet: Any, setter: Callable[[float], Any], args: argparse.Namespace) -> int:
    """Graphs dynamo compiles for a weight change of an already compiled UNet."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(unet, backend=args.compile_backend, dynamic=False)
    x = inputs(unet, args)
    with torch.inference_mode():
        forward(compiled, x)()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        setter(WEIGHTS[1])
        forward(compiled, x)()
        setter(WEIGHTS[0])
        forward(compiled, x)()
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_lora(Path(scratch), preset(args.preset).unet, rank=args.rank, seed=1)
        ways = Ways(args, folder)
        runs = [measure(ways, args, turn) for turn in range(args.repeats)]
    best = {key: min(run[key] for run in runs) for key in runs[0]}
    best["fused_recompiles"] = recompiles(ways.fused_unet, ways.set_fused, args)
    best["adapter_recompiles"] = recompiles(ways.adapter_unet, ways.set_adapter, args)
    best["adapter_overhead"] = round(best["adapter_unet_ms"] / best["plain_unet_ms"], 3)
    best["fused_overhead"] = round(best["fused_unet_ms"] / best["plain_unet_ms"], 3)
    return {
        key: round(value, 3) if isinstance(value, float) else value for key, value in best.items()
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "sd-turbo"])
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="UNet rows per call")
    parser.add_argument("--rank", type=int, default=8, help="the LoRA's rank")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--compile-backend", default="eager")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", help="result name (default lora-<preset>-<size>-<device>)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    return args


def main() -> None:
    args = parse_args()
    common.RESULTS = args.out.resolve()
    result = run(args)
    columns = [
        Column(key, key, ".3f" if isinstance(value, float) else "") for key, value in result.items()
    ]
    print(Table(columns).render([result]))
    config = {key: str(value) for key, value in vars(args).items() if key != "out"}
    config["threads"] = str(torch.get_num_threads())
    name = args.name or f"lora-{args.preset}-{args.size}-{args.device.type}"
    path = save_json(name, machine(), config, result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
