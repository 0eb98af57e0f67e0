"""Issue 17's last done-when line: tightfit against llm-compressor, optimum-quanto, HQQ and torchao
on the tiny-lm task (docs/tasks.md), same model, same metric, same evaluation code, same calibration.

Every side gets the same model: tiny-lm's GPT-2 blocks hold Hugging Face ``Conv1D`` layers (an
input-major matrix), which the peers do not quantize, so they are first converted to ``nn.Linear``
(the weight transposed; outputs equal), and only the blocks (``transformer.h.*``) are compressed:
the embedding, tied with the head, stays float32 on every side. Metric: the task's (minus the mean
token loss, nats per byte) on its test and validation splits. Calibration (GPTQ on both sides): the
first 256 sequences of the task's calibration loader (``benchmarks/calibrated_tasks.py``). File:
the bytes of what each tool itself saves of the whole model (tightfit: ``tightfit.save``; quanto:
``QuantizedModelForCausalLM.save_pretrained``; HQQ: ``AutoHQQHFModel.save_quantized``; torchao:
``torch.save`` of the state dict; llm-compressor: ``save_pretrained(save_compressed=True)``).

The peers are not tightfit dependencies; they need their own venv (llm-compressor pins
transformers<=5.17):

    python3.11 -m venv /work/venv-peers
    /work/venv-peers/bin/pip install -c constraints.txt -r benchmarks/peers-requirements.txt -e .
    nice -n 10 env PYTHONPATH=src:. /work/venv-peers/bin/python benchmarks/peers.py --out docs/results/peers_tiny-lm.json
    nice -n 10 env PYTHONPATH=src:. /work/venv-peers/bin/python benchmarks/peers.py --search 20 \\
        --out docs/results/peers_tiny-lm.json        # adds the search row, against the best peer's validation metric
    PYTHONPATH=src:. python benchmarks/peers.py --table docs/results/peers_tiny-lm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrated_tasks import model_inputs  # noqa: E402

BLOCKS = "transformer.h."
CALIBRATION = 256


def to_linear(model: nn.Module) -> nn.Module:
    """``model`` with every Hugging Face ``Conv1D`` (``y = x W + b``, W input-major) replaced by the
    equal ``nn.Linear`` (weight ``W.T``), as a user would before handing GPT-2 to a Linear-only tool."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(parent, name, linear)
    return model


def block_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules() if n.startswith(BLOCKS) and isinstance(m, nn.Linear))


def other_params(model: nn.Module) -> int:
    """Parameters outside the blocks' matrices (embeddings, LayerNorms, biases; tied ones once):
    every tool here keeps them float32."""
    unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values()) - block_weights(model)


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def storage(path: Path) -> dict[str, int]:
    """What the saved bytes are made of: ``deflated``, every file compressed with zlib level 6 (what
    a zip of it would hold); for a ``.tfz`` (a deflated zip already) ``unzipped``, its members' bytes."""
    import zipfile
    import zlib

    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    out = {"deflated": sum(len(zlib.compress(p.read_bytes(), 6)) for p in files)}
    if path.suffix == ".tfz":
        with zipfile.ZipFile(path) as z:
            out["unzipped"] = sum(i.file_size for i in z.infolist())
    return out


def sizes(out: Path, only: list[str]) -> None:
    """Only the saved files of ``only`` (no evaluation): what their bytes are made of, as partial
    rows (``setting``, ``storage``) in ``out`` that ``--merge`` adds to the measured rows."""
    from benchmarks.tasks import load_task

    task = load_task("tiny-lm")
    base = to_linear(task.model().eval())
    calibration = model_inputs(task.calibration, CALIBRATION)
    record = json.loads(out.read_text()) if out.exists() else {"rows": []}
    for label, _, arm in SETTINGS:
        if label not in only:
            continue
        work = Path(tempfile.mkdtemp(prefix="peers-"))
        _, path = arm(copy.deepcopy(base), calibration, work)
        row = {"setting": label, "storage": {"bytes": path_bytes(path), **storage(path)}}
        shutil.rmtree(work, ignore_errors=True)
        record["rows"] = [r for r in record["rows"] if r["setting"] != label] + [row]
        out.write_text(json.dumps(record, indent=1))
        print(row, flush=True)


def in_blocks(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.startswith(BLOCKS)


# Each arm: (model, calibration, directory) -> (model to evaluate, path the tool saved).
Arm = Callable[[nn.Module, list[Any], Path], tuple[nn.Module, Path]]


def tightfit_arm(bits: int, method: str, group: int, symmetric: bool = True) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        import tightfit

        strategy = tightfit.Quantize(bits, method=method, group_size=group, symmetric=symmetric, layers=[BLOCKS + "*"])
        result = tightfit.compress_once(model, strategy, calibration=calibration if method == "gptq" else None)
        tightfit.save(result.model, out / "model.tfz", plan=result.plan)
        return result.model, out / "model.tfz"

    return arm


def quanto_arm(bits: int) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        from optimum.quanto import QuantizedModelForCausalLM, qint2, qint4

        # quanto's int4/int2 weights are group-wise with its fixed group size (128), affine (a shift per group)
        qmodel = QuantizedModelForCausalLM.quantize(model, weights={4: qint4, 2: qint2}[bits], exclude="lm_head")
        qmodel.save_pretrained(str(out))
        return qmodel._wrapped, out

    return arm


def hqq_arm(bits: int, group: int) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        # GPT-2 is not in HQQ's block map: every top-level leaf and block named, all on the CPU
        blocks = {f"{BLOCKS}{i}": "cpu" for i in range(len(model.transformer.h))}
        blocks.update(
            {n: "cpu" for n, m in model.named_modules() if not n.startswith(BLOCKS) and not list(m.children())}
        )
        config = BaseQuantizeConfig(nbits=bits, group_size=group)
        AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32, device=blocks)
        AutoHQQHFModel.save_quantized(model, str(out))
        return model, out

    return arm


def torchao_arm(bits: int, group: int) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        dtype = getattr(torch, f"int{bits}")
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group)), filter_fn=in_blocks)
        torch.save(model.state_dict(), out / "model.pt")
        return model, out / "model.pt"

    return arm


def torchao_int4_arm(group: int) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        # torchao's int4 weight-only tensors want bfloat16 weights (its kernels' dtype)
        model = model.to(torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig(group_size=group), filter_fn=in_blocks)
        torch.save(model.state_dict(), out / "model.pt")
        return model, out / "model.pt"

    return arm


def llmcompressor_arm(bits: int, gptq: bool) -> Arm:
    def arm(model: nn.Module, calibration: list[Any], out: Path) -> tuple[nn.Module, Path]:
        import types

        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

        ids = torch.cat([b["input_ids"] for b in calibration])
        rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
        loader = torch.utils.data.DataLoader(rows, batch_size=16)
        modifier = GPTQModifier if gptq else QuantizationModifier
        if bits == 4:
            recipe = modifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
        else:  # W4A16's settings at 3 bits: symmetric int, group 128
            weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
            recipe = modifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
        # oneshot reads the model's config back from model.config.name_or_path: a user saves it first.
        model.config.save_pretrained(str(out / "float"))
        model.config.name_or_path = str(out / "float")
        # The byte-level model has no tokenizer; oneshot wants a processor object only to save it.
        oneshot(
            model=model,
            dataset=loader,
            recipe=recipe,
            num_calibration_samples=len(rows),
            processor=types.SimpleNamespace(),
        )
        model.save_pretrained(str(out / "saved"), save_compressed=True)  # it reads out / "float" too
        return model, out / "saved"

    return arm


SETTINGS: list[tuple[str, str, Arm]] = [
    ("llm-compressor GPTQ W4A16 (g128)", "llm-compressor", llmcompressor_arm(4, True)),
    ("llm-compressor RTN W4A16 (g128)", "llm-compressor", llmcompressor_arm(4, False)),
    ("llm-compressor GPTQ 3-bit g128", "llm-compressor", llmcompressor_arm(3, True)),
    ("optimum-quanto qint4 (g128)", "optimum-quanto", quanto_arm(4)),
    ("HQQ 4-bit g64", "hqq", hqq_arm(4, 64)),
    ("HQQ 4-bit g128", "hqq", hqq_arm(4, 128)),
    ("HQQ 3-bit g64", "hqq", hqq_arm(3, 64)),
    ("torchao Intx int4 g128", "torchao", torchao_arm(4, 128)),
    ("torchao Intx int4 g32", "torchao", torchao_arm(4, 32)),
    ("torchao Intx int3 g128", "torchao", torchao_arm(3, 128)),
    ("torchao Int4WeightOnly g128 (bfloat16 model)", "torchao", torchao_int4_arm(128)),
    ("tightfit RTN g128, 4 bit", "tightfit", tightfit_arm(4, "rtn", 128)),
    ("tightfit GPTQ g128, 4 bit", "tightfit", tightfit_arm(4, "gptq", 128)),
    ("tightfit GPTQ g64, 4 bit", "tightfit", tightfit_arm(4, "gptq", 64)),
    ("tightfit RTN g128 asymmetric, 4 bit", "tightfit", tightfit_arm(4, "rtn", 128, symmetric=False)),
    ("tightfit GPTQ g128 asymmetric, 4 bit", "tightfit", tightfit_arm(4, "gptq", 128, symmetric=False)),
    ("tightfit RTN g128, 3 bit", "tightfit", tightfit_arm(3, "rtn", 128)),
    ("tightfit GPTQ g128, 3 bit", "tightfit", tightfit_arm(3, "gptq", 128)),
]


def score(task: Any, model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        return {"test": float(task.test_metric(model)), "val": float(task.metric(model))}


def one_setting(task: Any, base: nn.Module, calibration: list[Any], label: str, tool: str, arm: Arm) -> dict:
    """One row: the arm on a fresh copy of the converted model, its file's bytes and its metrics;
    an arm that raises is recorded with its error (first line) instead."""
    row: dict[str, Any] = {"setting": label, "tool": tool}
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        out_model, path = arm(model, calibration, work)
        row["compress_s"] = round(time.perf_counter() - t0, 1)
        row["bytes"] = path_bytes(path)
        row["storage"] = storage(path)
        row["files"] = sorted(p.name for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        row.update(score(task, out_model.eval()))
    except Exception as e:  # noqa: BLE001 - a peer that fails is a result, recorded with its message
        lines = str(e).strip().splitlines() or [""]
        row["error"] = f"{type(e).__name__}: {lines[0]}"[:300]
        traceback.print_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def run(out: Path, only: list[str] | None) -> None:
    from benchmarks.tasks import load_task
    from tightfit.export import to_bytes

    torch.manual_seed(0)
    task = load_task("tiny-lm")
    base = to_linear(task.model().eval())
    calibration = model_inputs(task.calibration, CALIBRATION)
    record = json.loads(out.read_text()) if out.exists() and only else None
    if record is None:
        record = {
            "task": "tiny-lm",
            "calibration_samples": CALIBRATION,
            "block_weights": block_weights(base),
            "other_params": other_params(base),
            "versions": versions(),
            "rows": [{"setting": "float32", "tool": "-", **score(task, base), "bytes": len(to_bytes(base))}],
        }
    for label, tool, arm in SETTINGS:
        if only and label not in only:
            continue
        row = one_setting(task, base, calibration, label, tool, arm)
        record["rows"] = [r for r in record["rows"] if r["setting"] != label] + [row]
        record["load_average"] = os.getloadavg()
        out.write_text(json.dumps(record, indent=1))
        print(f"  {label:36s} {json.dumps({k: v for k, v in row.items() if k != 'files'})}", flush=True)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "optimum-quanto", "hqq", "torchao"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def search(out: Path, budget: int, method: str, peers_json: Path, samples: int) -> None:
    """One ``tightfit.compress`` search (objective size, no fine-tuning): per-layer 3 or 4 bits,
    GPTQ group 128, on the same calibration; the validation metric at least the best peer's in
    ``peers_json`` (MinMetric). ``samples``: calibration sequences (each trial runs GPTQ on them)."""
    import tightfit
    from benchmarks.tasks import load_task

    peers = [r for r in json.loads(peers_json.read_text())["rows"] if r["tool"] not in ("tightfit", "-") and "val" in r]
    best = max(peers, key=lambda r: r["val"])
    print(f"threshold: {best['setting']} val {best['val']:.5f}", flush=True)
    torch.manual_seed(0)
    task = load_task("tiny-lm")
    base = to_linear(task.model().eval())
    calibration = model_inputs(task.calibration, samples)
    t0 = time.perf_counter()
    result = tightfit.compress(
        base,
        evaluate=task.metric,
        strategy=tightfit.Quantize(bits=(3, 4), method="gptq", group_size=128, layers=[BLOCKS + "*"]),
        constraint=tightfit.MinMetric(best["val"]),
        objective="size",
        finetune=None,
        budget=budget,
        search=method,
        calibration=calibration,
        seed=0,
    )
    seconds = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    tightfit.save(result, work / "model.tfz")
    trials = [
        {"size": t.measurement.size_bytes, "val": t.measurement.metric, "feasible": t.feasible}
        for t in result.trials
        if t.measurement is not None
    ]
    row = {
        "setting": f"tightfit search (GPTQ g128, 3 or 4 bit per layer; {method}, budget {budget}, {samples} seq.)",
        "tool": "tightfit",
        "compress_s": round(seconds, 1),
        "bytes": path_bytes(work / "model.tfz"),
        "feasible": result.feasible,
        "threshold": {"setting": best["setting"], "val": best["val"]},
        "plan": json.loads(result.plan.to_json()),
        "trials": trials,
        **score(task, result.model.eval()),
    }
    shutil.rmtree(work, ignore_errors=True)
    record = json.loads(out.read_text()) if out.exists() else {"rows": []}
    record["rows"] = [r for r in record["rows"] if not r["setting"].startswith("tightfit search")] + [row]
    record["search_load_average"] = os.getloadavg()
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)


def minmax_grid(weight: torch.Tensor, bits: int, group: int, integer_zero: bool) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per group of ``group`` input weights: the zero point
    rounded to an integer code (tightfit's, GPTQ's) or left a float (quanto's shift)."""
    rows = weight.reshape(-1, group)
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale, top = (high - low) / (2**bits - 1), 2**bits - 1
    if integer_zero:
        zero = (-low / scale).round()
        codes = ((rows / scale).round() + zero).clamp(0, top)
        return ((codes - zero) * scale).reshape(weight.shape)
    return (((rows - low) / scale).round().clamp(0, top) * scale + low).reshape(weight.shape)


def zero_point_check(sequences: int = 64) -> None:
    """Why quanto's round-to-nearest loses less than tightfit's: per-layer weight error of both,
    and the loss on the first ``sequences`` test sequences of tightfit's asymmetric RTN g128 4 bit,
    quanto's qint4, and the same min-max grid with an integer or a float zero point."""
    from optimum.quanto import freeze, qint4, quantize

    import tightfit
    from benchmarks.tasks import load_task
    from benchmarks.tasks.lm import lm_datasets, mean_loss

    base = to_linear(load_task("tiny-lm").model().eval())
    test = lm_datasets(0)[2]
    test.blocks = test.blocks[:sequences]
    ours = tightfit.compress_once(base, tightfit.Quantize(4, group_size=128, symmetric=False, layers=[BLOCKS + "*"]))
    theirs = copy.deepcopy(base)
    quantize(theirs, weights=qint4)
    freeze(theirs)
    names = [n for n, m in base.named_modules() if in_blocks(m, n)]
    mods = {k: dict(v.named_modules()) for k, v in (("base", base), ("ours", ours.model), ("theirs", theirs))}
    weights = {n: mods["base"][n].weight.detach() for n in names}
    for n in names:
        err_ours = float(((mods["ours"][n].weight.detach() - weights[n]) ** 2).mean())
        err_theirs = float(((mods["theirs"][n].qweight.dequantize().detach() - weights[n]) ** 2).mean())
        print(f"{n}: squared error tightfit {err_ours:.3e} quanto {err_theirs:.3e}")

    def with_grid(integer_zero: bool) -> nn.Module:
        model = copy.deepcopy(base)
        for n, m in model.named_modules():
            if n in weights:
                m.weight.data = minmax_grid(weights[n], 4, 128, integer_zero)
        return model

    losses = {
        "float32": mean_loss(base, test),
        "tightfit RTN g128 asymmetric": mean_loss(ours.model, test),
        "quanto qint4": mean_loss(theirs, test),
        "min-max grid, integer zero point": mean_loss(with_grid(True), test),
        "min-max grid, float zero point": mean_loss(with_grid(False), test),
    }
    print(json.dumps(losses, indent=1))


def merge(out: Path, parts: list[Path]) -> None:
    """One record of several runs' JSON (``--only`` runs in parallel processes): the first part's
    float32 row and settings, every part's rows in SETTINGS order, the search row last."""
    records = [json.loads(p.read_text()) for p in parts]
    merged = {k: v for k, v in records[0].items() if k != "rows"}
    if "other_params" not in merged:
        from benchmarks.tasks import load_task

        merged["other_params"] = other_params(to_linear(load_task("tiny-lm").model()))
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:  # a later measured row replaces an earlier one (a rerun of a failed setting);
        for r in rec["rows"]:  # a --sizes row only adds its "storage"
            old = rows.get(r["setting"], {})
            if "test" in r or "error" in r:
                rows[r["setting"]] = {**({"storage": old["storage"]} if "storage" in old else {}), **r}
            else:
                rows[r["setting"]] = {**old, **r}
    order = ["float32"] + [label for label, _, _ in SETTINGS]
    merged["rows"] = [rows[k] for k in order if k in rows] + [r for k, r in rows.items() if k not in order]
    merged["parts"] = [{"file": p.name, "load_average": rec.get("load_average")} for p, rec in zip(parts, records)]
    out.write_text(json.dumps(merged, indent=1))


def markdown(record: dict[str, Any]) -> str:
    """One table: test loss (perplexity), loss against float32, file bytes, bits per block weight
    (the file's bytes less 4 per parameter outside the blocks' matrices, per block weight: codes,
    scales, zero points and the container's overhead)."""
    base, weights, rest = record["rows"][0], record["block_weights"], 4 * record.get("other_params", 0)
    out = [
        "| setting | test loss (ppl) | test loss vs float32 (nats) | val loss vs float32 | file bytes"
        " | bits per block weight | file deflated (zlib 6) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        if "error" in row:
            out.append(f"| {row['setting']} | failed: {row['error']} | | | | | | |")
            continue
        if "test" not in row:  # a --sizes row whose setting was not measured
            continue
        cells = [
            f"{-row['test']:.4f} ({math.exp(-row['test']):.3f})",
            f"{base['test'] - row['test']:+.4f}",
            f"{base['val'] - row['val']:+.4f}",
            f"{row['bytes']:,}",
            f"{8 * (row['bytes'] - rest) / weights:.2f}",
            f"{row['storage']['deflated']:,}" if "storage" in row else "-",
            f"{row['compress_s']:.1f}" if "compress_s" in row else "-",
        ]
        out.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/peers_tiny-lm.json"))
    parser.add_argument("--only", nargs="+", help="run only these settings (labels as in SETTINGS), into --out")
    parser.add_argument("--search", type=int, help="add one tightfit.compress search of this budget to --out")
    parser.add_argument("--search-method", default="tpe", help="tightfit's search= (default tpe: no sensitivity scan)")
    parser.add_argument(
        "--peers", type=Path, help="the JSON whose best peer sets the search's threshold (default --out)"
    )
    parser.add_argument(
        "--search-calibration", type=int, default=CALIBRATION, help="the search's calibration sequences"
    )
    parser.add_argument("--sizes", action="store_true", help="with --only: only the files' make-up, into --out's rows")
    parser.add_argument("--zero-point-check", action="store_true", help="only the RTN zero-point check (quanto)")
    parser.add_argument("--table", type=Path, help="only print the table of this JSON record")
    parser.add_argument("--merge", type=Path, nargs="+", help="only merge these JSON records into --out")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.merge:
        merge(args.out, args.merge)
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(1)  # one thread: on the shared 2-core machine two spin-wait (docs/tasks.md)
    if args.zero_point_check:
        zero_point_check()
        return
    if args.sizes:
        sizes(args.out, args.only or [])
        return
    if args.search:
        search(args.out, args.search, args.search_method, args.peers or args.out, args.search_calibration)
        return
    run(args.out, args.only)
    print(markdown(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
