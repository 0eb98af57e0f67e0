"""Check that benchmarks/tasks/mobilenet.py is torchvision's MobileNetV2: load the same ImageNet
state_dict into both and compare outputs on the same inputs. Needs an importable torchvision
(not this venv's: see mobilenet.py); run it with a Python where torchvision imports, e.g.

    PYTHONPATH=/path/to/tightfit python -m benchmarks.tasks.verify_mobilenet
"""

from __future__ import annotations

import torch


def main() -> int:
    import torchvision

    from benchmarks.tasks.mobilenet import MobileNetV2, imagenet_weights_path

    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    theirs = torchvision.models.mobilenet_v2()
    theirs.load_state_dict(state, strict=True)
    ours = MobileNetV2()
    ours.load_state_dict(state, strict=True)
    theirs.eval(), ours.eval()
    torch.manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for size in (224, 64):
            x = torch.randn(4, 3, size, size)
            a, b = theirs(x), ours(x)
            worst = max(worst, float((a - b).abs().max()))
            print(
                f"{size}x{size}: max |difference| {float((a - b).abs().max()):.3g}, same top-1 {bool((a.argmax(1) == b.argmax(1)).all())}"
            )
    print(f"torchvision {torchvision.__version__}: {'identical' if worst < 1e-4 else 'DIFFERENT'} (worst {worst:.3g})")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
