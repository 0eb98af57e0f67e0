"""Wall time of one GPTQ g128 4-bit compression of tiny-lm's blocks: tightfit with cached block
inputs (each layer's statistics from running its block alone; ``tightfit.operators.blocks``)
against the whole-model passes it replaces (``block_cache=False``), and llm-compressor's GPTQ
W4A16 where installed, interleaved in one process, one thread. The same model and calibration as
benchmarks/peers.py (its 16 Linear layers, the first 256 calibration sequences). Also: whether
the two tightfit arms give the same weights, each arm's test metric (``test_metric``, the task's;
tiny-lm's is minus the loss; the first JSON, gptq_speed_tiny-lm.json, recorded ``test_loss``), and
(``--profile``) where one compression's time goes (cProfile, one run per tightfit arm after the
timed rounds). ``--task minilm``: the two tightfit arms on the minilm encoder's 36 Linears.

    nice -n 10 env PYTHONPATH=src:. /work/venv-peers/bin/python benchmarks/gptq_speed.py --rounds 3 \\
        --llmc --profile --out docs/results/gptq_speed_tiny-lm.json
    nice -n 10 env PYTHONPATH=src:. /work/venv/bin/python benchmarks/gptq_speed.py --task minilm --rounds 3 \\
        --profile --out docs/results/gptq_speed_minilm.json
    nice -n 10 env PYTHONPATH=src:. /work/venv/bin/python benchmarks/gptq_speed.py --encode
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.calibrated_tasks import model_inputs  # noqa: E402
from benchmarks.peers import BLOCKS, CALIBRATION, llmcompressor_arm, to_linear  # noqa: E402

#: cProfile rows that make up a compression's time (cumulative seconds of these functions)
PARTS: dict[str, tuple[str, str]] = {
    "calibration forward passes (block or model)": ("calibration.py", "collect_stats"),
    "statistics hook (Hessian einsum, sums)": ("calibration.py", "hook"),
    "GPTQ solve (per layer)": ("solvers.py", "gptq"),
    "Cholesky / inverse": ("solvers.py", "inverse_hessian_factor"),
    "order and block check pass (first batch)": ("blocks.py", "survey"),
    "block inputs: capture": ("blocks.py", "capture"),
    "block inputs: advance": ("blocks.py", "advance"),
    "apply_plan_calibrated (all)": ("calibrated.py", "apply_plan_calibrated"),
}


#: task -> the layers compressed (as in benchmarks/calibrated_tasks.py and peers.py)
LAYERS = {"tiny-lm": BLOCKS + "*", "minilm": "bert.encoder.*"}


def tightfit_arm(block_cache: bool, layers: str = BLOCKS + "*"):
    def arm(model: torch.nn.Module, calibration: list[Any]) -> tuple[torch.nn.Module, dict]:
        import tightfit
        from tightfit.operators.calibrated import apply_plan_calibrated
        from tightfit.run.oneshot import one_shot_plan

        strategy = tightfit.Quantize(4, method="gptq", group_size=128, layers=[layers])
        plan, _ = one_shot_plan(model, strategy)
        result = apply_plan_calibrated(plan, model, calibration, block_cache=block_cache)
        info = {"blocks": result.blocks, "block_passes": result.block_passes, "passes": result.calibration_passes}
        return model, info

    return arm


def llmc_arm(model: torch.nn.Module, calibration: list[Any]) -> tuple[torch.nn.Module, dict]:
    work = Path(tempfile.mkdtemp(prefix="gptq-speed-"))
    out, _ = llmcompressor_arm(4, True)(model, calibration, work)
    return out, {}


def profile_parts(arm, base: torch.nn.Module, calibration: list[Any]) -> dict[str, float]:
    profiler = cProfile.Profile()
    model = copy.deepcopy(base)
    profiler.enable()
    arm(model, calibration)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    parts = {}
    for label, (where, function) in PARTS.items():
        total = 0.0
        for (path, _, name), (_, _, _, cumulative, _) in stats.items():
            if function == name and path.endswith(where):
                total += cumulative
        parts[label] = round(total, 2)
    return parts


def encode_time(base: torch.nn.Module, calibration: list[Any]) -> None:
    """The encoding's share: ``tightfit.save`` of one compressed model, three times."""
    import tightfit

    model, _ = tightfit_arm(True)(copy.deepcopy(base), calibration)
    path = Path(tempfile.mkdtemp(prefix="gptq-speed-")) / "model.tfz"
    for _ in range(3):
        t0 = time.perf_counter()
        tightfit.save(model, path)
        print(f"tightfit.save {time.perf_counter() - t0:.2f} s, {path.stat().st_size} B, load {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tiny-lm", choices=sorted(LAYERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llmc", action="store_true", help="time llm-compressor's GPTQ W4A16 too (peers venv)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--encode", action="store_true", help="only: one compression, then time tightfit.save 3x")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from benchmarks.tasks import load_task

    task = load_task(args.task)
    base = task.model().eval()
    base = to_linear(base) if args.task == "tiny-lm" else base
    calibration = model_inputs(task.calibration, CALIBRATION)
    if args.encode:
        encode_time(base, calibration)
        return
    if args.out is None:
        parser.error("--out is required (except with --encode)")
    layers = LAYERS[args.task]
    arms = {"tightfit, whole-model passes (block_cache=False)": tightfit_arm(False, layers)}
    arms["tightfit, cached block inputs"] = tightfit_arm(True, layers)
    if args.llmc and args.task == "tiny-lm":  # llm-compressor on minilm: benchmarks/peers_minilm.py
        arms["llm-compressor GPTQ W4A16 (g128)"] = llmc_arm
    record: dict[str, Any] = {"task": args.task, "calibration_samples": CALIBRATION, "rounds": [], "arms": {}}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(args.rounds):
        names = list(arms) if r % 2 == 0 else list(reversed(arms))
        for name in names:
            model = copy.deepcopy(base)
            load = os.getloadavg()
            t0 = time.perf_counter()
            out, info = arms[name](model, calibration)
            seconds = time.perf_counter() - t0
            record["rounds"].append({"round": r, "arm": name, "seconds": round(seconds, 1), "load": load, **info})
            print(record["rounds"][-1], flush=True)
            if r == 0:
                with torch.no_grad():
                    record["arms"][name] = {"test_metric": float(task.test_metric(out.eval()))}
                if name.startswith("tightfit"):
                    weights[name] = {k: v.detach().clone() for k, v in out.state_dict().items()}
            args.out.write_text(json.dumps(record, indent=1))
    old, new = (weights[n] for n in list(arms)[:2])
    record["max_abs_weight_difference"] = max(float((old[k].float() - new[k].float()).abs().max()) for k in old)
    for name in arms:
        times = [x["seconds"] for x in record["rounds"] if x["arm"] == name]
        record["arms"][name]["seconds"] = times
    first, second = (record["arms"][n]["seconds"] for n in list(arms)[:2])
    record["ratio_per_round"] = [round(a / b, 2) for a, b in zip(first, second)]
    if args.profile:
        for name in list(arms)[:2]:
            record["arms"][name]["profile"] = profile_parts(arms[name], base, calibration)
            print(name, record["arms"][name]["profile"], flush=True)
    record["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
