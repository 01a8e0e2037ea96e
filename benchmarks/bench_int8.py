"""What 8-bit integer arithmetic would buy the served network on this CPU, and what it would cost in
accuracy: the shipped model's ONNX export (what onnxruntime serves today, float32) against the same
export quantized by `runtime.quantize_onnx` (onnxruntime's static quantization, QDQ, weights int8 per
channel, activations uint8), with full 8-bit weights (``int8``) and with 7-bit ones (``int8-7bit``,
`reduce_range`: what `ensemble -P precision=int8` makes), calibrated on `--calibration` training faces
drawn as the ensemble stage draws them. Each is timed on 3,589 crops in batches of 256 (median of
`--repeats`, the networks interleaved) and scored on the validation split of `--data`, plain and with
the served ten views; PublicTest is not read.

    python benchmarks/bench_int8.py --data <dataset.npz of the clean run> [--variant accurate]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fer_mlflow import pretrained
from fer_mlflow.data import dataset as datasets
from fer_mlflow.serving import runtime, views

BATCH = 256


def crops_per_second(network: runtime.Network, pixels: np.ndarray) -> float:
    started = time.perf_counter()
    network.predict(pixels, batch_size=BATCH)
    return len(pixels) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset.npz with train and val splits")
    parser.add_argument("--variant", default="accurate", choices=pretrained.VARIANTS)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    data = datasets.load(args.data)
    train, val = data.split("train"), data.split("val")
    val_pixels = datasets.model_input(val.images)
    keras_model = pretrained.keras_model(args.variant)
    chosen = runtime.calibration_choice(len(train), args.calibration)  # as the ensemble stage draws them
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        exported = runtime.export_onnx(keras_model, folder / "model.onnx")
        calibration = datasets.model_input(train.images[chosen])
        quantized = {name: runtime.quantize_onnx(exported, folder / f"{name}.onnx", calibration, reduce_range=seven)
                     for name, seven in (("int8", False), ("int8-7bit", True))}
        networks = {"float32": runtime.onnx_network(exported),
                    **{name: runtime.onnx_network(path) for name, path in quantized.items() if path is not None}}
        sizes = {"float32": exported.stat().st_size,
                 **{name: path.stat().st_size for name, path in quantized.items() if path is not None}}
        crops = np.resize(val_pixels, (3589, 48, 48, 1))
        speed = {name: [] for name in networks}
        for _ in range(args.repeats):
            for name, network in networks.items():
                speed[name].append(crops_per_second(network, crops))
        found = {}
        for name, network in networks.items():
            plain = network.predict(val_pixels, batch_size=BATCH)
            tta = views.probabilities(network, val_pixels, views.Settings(tta=True))
            found[name] = (plain, tta)
            print(f"{name}: {sizes[name] / 2**20:.1f} MiB, {statistics.median(speed[name]):,.0f} crops/s "
                  f"(median of {args.repeats}: {', '.join(f'{s:,.0f}' for s in speed[name])}); val "
                  f"{np.mean(plain.argmax(1) == val.labels):.4f} plain, "
                  f"{np.mean(tta.argmax(1) == val.labels):.4f} ten views ({len(val)} faces)")
    for name in [name for name in networks if name != "float32"]:
        for index, kind in enumerate(("plain", "ten views")):
            a, b = found["float32"][index], found[name][index]
            print(f"{kind}: {name} names float32's class for {np.mean(a.argmax(1) == b.argmax(1)):.4f} of the faces; "
                  f"largest probability difference {np.abs(a - b).max():.3f}")
        print(f"{name} / float32 crops/s: {statistics.median(speed[name]) / statistics.median(speed['float32']):.2f}x")


if __name__ == "__main__":
    main()
