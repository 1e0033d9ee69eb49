"""CPU speed of vitkit against timm, HF transformers and vit-pytorch, measured side by side in one process.

    .venv/bin/python benchmarks/speed.py               # everything (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/speed.py --quick       # Ti/16 only, fewer repetitions (a smoke run)

What it measures:
- the machine's ceiling: a large fp32 and bf16 matmul, GFLOP/s, and an int8 one (torch._int_mm), GOP/s; each row's
  fraction of the ceiling is of its own number format's (fp32, bf16 or int8);
- which mode vitkit's `--precision auto` chooses at each model and batch (timed afresh, vitkit.fastest_mode), and the
  raised goals: auto >= 1.2x the fastest ONNX Runtime / OpenVINO mode, vitkit fp32 >= the fastest runtime fp32;
- inference images/s of Ti/16, S/16 and B/16 at 224x224, batch 1 and 16: vitkit in each mode
  (vitkit.inference_modes) against timm (eager fp32, eager with bf16 weights), HF transformers
  (ViTForImageClassification, SDPA attention) and vit-pytorch, and against ONNX Runtime (CPU, every graph
  optimisation, as many threads as torch) running the same vitkit model exported to ONNX (vitkit.export), fp32 and
  dynamically quantised to int8 (needs the `export` extra; `--no-onnx` leaves it out), and against OpenVINO's CPU
  plugin on the same file made static for the batch, fp32, bf16 and int8 quantised by NNCF (needs the `bench` extra,
  which `make setup` installs; `--no-openvino` leaves it out). vitkit loads timm's and HF's weights through its
  converters and its logits are compared with theirs and with the runtimes'. vit-pytorch's ViT is not the paper's
  (LayerNorms around its patch embedding), so it gets the same dimensions but its own weights;
- training images/s (forward, cross-entropy, backward, AdamW step) of the default Fashion-MNIST shape and
  of Ti/16 at 224: vitkit against timm, each eager fp32, eager with bf16 autocast and compiled with bf16 autocast
  (each compiled as its trainer does: vitkit with the activation budget of vitkit.train.compile); with `--no-bf16`
  eager fp32 and compiled fp32;
- the peak memory each adds while it runs: in a fresh process per contender, how far the peak resident
  set rises above its size once the models are built, over the first call (compilation included) and,
  separately, over the calls after it (batch 16 for inference; compiled contenders only in the
  Fashion-MNIST training shape, as compiling the 224-pixel graphs a second time takes too long).
  The process runs with glibc's mmap threshold fixed at 64 KiB, so every freed tensor goes back to the
  system at once: the peak then follows the tensors alive together, and repeats to within 0.1 MB. With
  glibc's adaptive threshold the same contender read anywhere between 176 and 193 MB.

The process first tells glibc to keep freed memory for reuse (vitkit.allocator; `--system-allocator` leaves
it), as vitkit's command line does: every contender then runs with it, and none pays for page faults that a
batch's re-allocated tensors would otherwise take.

Contenders are interleaved: every repetition runs each once, in turn, so machine noise hits all alike;
the figures are medians over repetitions. Each row also gives the ratio to timm eager fp32 and the
fraction of the matmul ceiling reached (model FLOPs x images/s / the ceiling of the mode's number format).
Checks the speed issue's goals against the figures, and writes a markdown table and JSON to
docs/results/speed_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import header_lines, provenance, result_base, write_json

import vitkit
from vitkit import allocator
from vitkit.export import INSTALL_HINT, export_onnx, needs_external_data, quantise_int8
from vitkit.inference_modes import InferenceModel, fastest_inference_mode, onednn_int8_available
from vitkit.int8_calibration import calibrate_int8
from vitkit.runtime import cpu_has_native_bf16, cpu_has_vnni
from vitkit.train.compile import compile_for_training

SIZES = {"Ti/16": ("tiny", 192, 12, 3, 768), "S/16": ("small", 384, 12, 6, 1536), "B/16": ("base", 768, 12, 12, 3072)}


# --- what the hardware can do ------------------------------------------------------------------------------------

def matmul_ceiling(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float | None:
    """Median GFLOP/s (GOP/s for int8) of an n x n matmul in `dtype`: fp32 and bf16 by `@`, int8 by torch._int_mm
    (int8 operands, int32 accumulation and result: oneDNN's VNNI or AMX kernels where the CPU has them).

    Where the CPU has no int8 dot products (VNNI, AMX), torch._int_mm falls back to a reference loop (1 GOP/s on an AMD
    EPYC without AVX-512), and vitkit's int8 runs on fbgemm's linear with 7-bit weights instead: the int8 ceiling is
    then that linear's, with its activation quantisation. Where the CPU has no bf16 dot products, bf16 is emulated and
    there is no bf16 ceiling (None)."""
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return None
    if dtype == torch.int8 and not cpu_has_vnni():
        with warnings.catch_warnings():  # torch 2.14 deprecates quantised tensors; fbgemm's linear still takes them
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated.*")
            weight = torch.quantize_per_tensor(torch.randn(n, n), 0.01, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(weight, None)
        a, b = torch.randn(n, n), packed

        def multiply(x, w):
            return torch.ops.quantized.linear_dynamic(x, w, False)  # 8-bit activations, as vitkit's int8 there
    elif dtype == torch.int8:
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=generator) for _ in range(2))
        multiply = torch._int_mm
    else:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        multiply = torch.matmul
    for _ in range(2):
        multiply(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        multiply(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def vit_flops(width: int, depth: int, mlp: int, tokens: int, patch_inputs: int, classes: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one image: matmuls and attention, the parts that cost."""
    patches = tokens - 1
    per_block = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    return 2 * patches * patch_inputs * width + depth * per_block + 2 * width * classes


# --- peak memory --------------------------------------------------------------------------------------------------

def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def peak_extra_memory(run) -> dict[str, int] | None:
    """Bytes the process's peak resident set rises above its current size while `run()` runs (Linux):
    over the first call ("first", which includes compilation and one-time set-up) and over two calls after it
    ("warm", what every further step or batch holds).

    Meaningful in a fresh process only: once an allocator has grown, it reuses what it holds.
    """
    clear_refs = Path("/proc/self/clear_refs")
    try:
        clear_refs.write_text("5")  # resets the peak (VmHWM) to the current size
    except OSError:
        return None

    def rise(calls: int) -> int:
        clear_refs.write_text("5")
        before = _status("VmRSS")
        for _ in range(calls):
            run()
        return max(0, _status("VmHWM") - before)

    first = rise(1)
    return {"first": first, "warm": rise(2)}


MMAP_THRESHOLD = 64 * 1024  # bytes; allocations from this size up are mapped and unmapped one by one


def memory_in_fresh_process(kind: str, what: str, batch: int, contender: str) -> dict[str, int] | None:
    """`peak_extra_memory` of one contender, measured in a new Python process (see --memory-child)."""
    spec = json.dumps({"kind": kind, "what": what, "batch": batch, "contender": contender})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    done = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"memory of {contender} could not be measured: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return value


def _memory_child(spec: str) -> int:
    job = json.loads(spec)
    if job["kind"] == "inference":
        contenders, _, _ = inference_contenders(job["what"], "compile" in job["contender"],
                                                job["contender"].startswith("onnxruntime"),
                                                job["contender"].startswith("openvino"), job["batch"],
                                                with_auto=False, with_bf16="bf16" in job["contender"])
        x = torch.randn(job["batch"], 3, 224, 224)
        run = contenders[job["contender"]]

        def call():
            with torch.inference_mode():
                run(x)
    else:
        contenders, *_ = training_contenders(job["what"], job["batch"], "compile" in job["contender"],
                                             with_bf16="bf16" in job["contender"])
        call = contenders[job["contender"]]
    print(json.dumps(peak_extra_memory(call)))
    return 0


# --- contenders ---------------------------------------------------------------------------------------------------

def inference_contenders(size: str, with_compile: bool, with_onnx: bool = False, with_openvino: bool = False,
                         batch: int = 16, with_auto: bool = True,
                         with_bf16: bool = True) -> tuple[dict, dict, dict | None]:
    """{name: callable(images) -> logits}, {name: max |logit difference| against the vitkit twin}, and the mode
    vitkit's `--precision auto` runs at `batch` ({"precision", "median_ms"}: timed afresh, not read from a cache; None
    without `with_auto`). Without `with_bf16`, no contender computes in bf16.
    OpenVINO's model is made static for `batch`, as a deployer who knows the batch would."""
    import timm
    import transformers
    from vit_pytorch import ViT as VitPytorch

    tag, width, depth, heads, mlp = SIZES[size]
    torch.manual_seed(0)
    timm_model = timm.create_model(f"vit_{tag}_patch16_224", pretrained=False, num_classes=1000).eval()
    model = vitkit.create_model(size, num_classes=1000).eval()
    vitkit.load_weights(model, timm_model.state_dict())  # the same weights, through vitkit's converter

    hf_config = transformers.ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                       intermediate_size=mlp, image_size=224, patch_size=16, num_labels=1000,
                                       layer_norm_eps=1e-6, attn_implementation="sdpa")
    hf_model = transformers.ViTForImageClassification(hf_config).eval()
    hf_twin = vitkit.create_model(size, num_classes=1000).eval()
    vitkit.load_weights(hf_twin, hf_model.state_dict())
    vp_model = VitPytorch(image_size=224, patch_size=16, num_classes=1000, dim=width, depth=depth, heads=heads,
                          mlp_dim=mlp, dim_head=width // heads).eval()
    timm_bf16 = copy.deepcopy(timm_model).to(torch.bfloat16)

    contenders = {
        "timm fp32": lambda x: timm_model(x),
        "timm bf16 weights": lambda x: timm_bf16(x.bfloat16()).float(),
        "HF transformers fp32 (sdpa)": lambda x: hf_model(pixel_values=x).logits,
        "vit-pytorch fp32": lambda x: vp_model(x),
    }
    modes = [("fp32", False), ("bf16", False), ("bf16-mixed", False), ("int8", False)]
    if with_compile:
        modes += [("fp32", True), ("bf16", True), ("int8", True)]
    if not with_bf16:
        del contenders["timm bf16 weights"]
        modes = [(precision, compiled) for precision, compiled in modes if "bf16" not in precision]
    auto = None
    if with_auto:
        with tempfile.TemporaryDirectory(prefix="vitkit-speed-cache-") as cache:
            choice = fastest_inference_mode(model, torch.device("cpu"), batch, cache=Path(cache))
        auto = {"precision": choice.precision, "median_ms": choice.median_ms}
    for precision, compiled in modes:
        runner = InferenceModel(model, precision, compile=compiled, batch_size=batch)
        contenders[f"vitkit {precision}" + (" + compile" if compiled else "")] = runner
    if onednn_int8_available():
        # int8 with its activation ranges measured beforehand, on the random images OpenVINO's int8 is calibrated on
        calibration = calibrate_int8(model, random_calibration_images((batch, 3, 224, 224)))
        for compiled in (False, True) if with_compile else (False,):
            contenders["vitkit int8 calibrated" + (" + compile" if compiled else "")] = InferenceModel(
                model, "int8", compile=compiled, batch_size=batch, int8_calibration=calibration)
    if with_onnx or with_openvino:
        contenders.update(exported_contenders(model, with_onnx, with_openvino, batch))
    if not with_bf16:
        contenders.pop("openvino bf16", None)

    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(x)
        differences = {"timm fp32": float((timm_model(x) - reference).abs().max()),
                       "HF transformers fp32 (sdpa)": float((hf_model(pixel_values=x).logits - hf_twin(x)).abs().max())}
        for name, run in contenders.items():
            if name.startswith(("vitkit", "onnxruntime", "openvino")) or name == "timm bf16 weights":
                differences[name] = float((run(x) - reference).abs().max())
    return contenders, differences, auto


def describe_auto(auto: dict) -> str:
    """"int8 (timed: int8 21.40 ms, bf16 30.10 ms)" for the mode `--precision auto` chose, fastest timing first."""
    timings = auto.get("median_ms")
    if not timings:
        return f"{auto['precision']} (by the CPU's features alone)"
    ordered = sorted(timings.items(), key=lambda item: item[1])
    return f"{auto['precision']} (timed: {', '.join(f'{mode} {ms:.2f} ms' for mode, ms in ordered)})"


def onnx_unavailable() -> str | None:
    """Why the ONNX Runtime contenders cannot run in this environment, or None if they can."""
    for name in ("onnx", "onnxscript", "onnxruntime"):  # what vitkit.export needs to write and run the file
        try:
            __import__(name)
        except ImportError as err:
            return f"{err} ({INSTALL_HINT})"
    return None


def openvino_unavailable() -> str | None:
    """Why the OpenVINO contenders cannot run in this environment, or None if they can."""
    for name in ("onnx", "onnxscript", "openvino", "nncf"):  # the export, the runtime and its int8 quantiser
        try:
            __import__(name)
        except ImportError as err:
            return f"{err} (pip install -e '.[bench,export]')"
    return None


def exported_contenders(model: vitkit.ViT, with_onnx: bool, with_openvino: bool, batch: int,
                        calibration: torch.Tensor | None = None) -> dict:
    """{name: callable(images) -> logits}: `model` exported to ONNX once and run by ONNX Runtime (fp32, dynamic int8)
    and by OpenVINO (fp32, bf16, int8 calibrated on `calibration` images, random ones if None)."""
    contenders = {}
    with tempfile.TemporaryDirectory(prefix="vitkit-speed-onnx-") as directory:
        fp32 = Path(directory) / "model.onnx"
        export_onnx(model, fp32, dynamic=False, opset=18)  # the batch stays dynamic: one file serves every batch
        if with_onnx:
            contenders.update(onnx_runtime_contenders(fp32, needs_external_data(model)))
        if with_openvino:
            contenders.update(openvino_contenders(fp32, (batch, model.cfg.in_chans, *model.cfg.img_size),
                                                  calibration))
    return contenders


def openvino_contenders(onnx_file: Path, shape: tuple[int, int, int, int],
                        calibration: torch.Tensor | None = None) -> dict:
    """OpenVINO's CPU plugin on the exported file, made static for the input `shape` (batch, channels, height,
    width): fp32 and bf16 (its inference precision hint), and int8 quantised by NNCF (OpenVINO's post-training
    quantiser, its transformer preset) on the `calibration` images (N, C, H, W), as a deployer would calibrate on
    their data, or on 32 random images where there is none (the speed runs, whose models are random too); its other
    operations in OpenVINO's default precision for this CPU."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_file))
    model.reshape(list(shape))
    settings = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    contenders = {}
    for name, precision in (("openvino fp32", "f32"), ("openvino bf16", "bf16")):
        compiled = core.compile_model(model, "CPU", {**settings, "INFERENCE_PRECISION_HINT": precision})
        contenders[name] = _openvino_runner(compiled)
    if calibration is None:
        calibration = random_calibration_images(shape)
    batches = [calibration[i:i + shape[0]].numpy() for i in range(0, len(calibration) - shape[0] + 1, shape[0])]
    if not batches:
        raise ValueError(f"OpenVINO's int8 calibration needs at least one batch of {shape[0]} images, got "
                         f"{len(calibration)}")
    # NNCF's overflow fix (weights on 7 bits) for every layer on a CPU without VNNI, whose 8-bit multiply-adds
    # saturate (its default fixes the first layer only): a small random ViT's logits were off by 29% of their range
    # without it on an AMD EPYC without VNNI, 6% with it.
    overflow_fix = nncf.OverflowFix.FIRST_LAYER if cpu_has_vnni() else nncf.OverflowFix.ENABLE
    quantised = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(batches),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix))
    contenders["openvino int8"] = _openvino_runner(core.compile_model(quantised, "CPU", settings))
    return contenders


def random_calibration_images(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The images OpenVINO's int8 and vitkit's calibrated int8 are calibrated on when no real ones are given: 32
    (a whole number of batches of `shape`'s batch) normal random ones of `shape`'s image size, the same every run."""
    generator = torch.Generator().manual_seed(3)
    return torch.randn(max(1, 32 // shape[0]) * shape[0], *shape[1:], generator=generator)


def _openvino_runner(compiled):
    request = compiled.create_infer_request()

    def run(images: torch.Tensor) -> torch.Tensor:
        request.infer({0: images.numpy()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def onnx_runtime_contenders(fp32: Path, external_data: bool) -> dict:
    """{name: callable(images) -> logits}: the exported file run by ONNX Runtime, fp32 and dynamically quantised to
    int8."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the cores torch gets, no more
    options.inter_op_num_threads = 1  # one chain of operators: a second pool would only compete for the same cores
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers say nothing about speed
    contenders = {}
    int8 = fp32.with_name("model.int8.onnx")
    quantise_int8(fp32, int8, external_data=external_data)
    # A session reads the whole graph and its weights when it is built, so the files may go with their directory.
    for name, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        contenders[name] = _onnx_runner(session)
    return contenders


def _onnx_runner(session):
    input_name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        # .numpy() and from_numpy share the tensor's memory: the batch is not copied on either side of the call
        return torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
    return run


def training_contenders(shape: str, batch: int, with_compile: bool,
                        with_bf16: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor, float]:
    """{name: step()} training steps of vitkit and timm with the same configuration, the data, and FLOPs/image.
    Compiled, each trains in bf16 autocast, or in fp32 without `with_bf16` (which also leaves out the eager bf16
    steps)."""
    from timm.models.vision_transformer import VisionTransformer

    if shape == "fashion-mnist default":
        dims = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, width=128, depth=4, heads=4, mlp_dim=256)
    else:
        dims = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, width=192, depth=12, heads=3,
                    mlp_dim=768)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, dims["in_chans"], dims["img_size"], dims["img_size"], generator=g)
    labels = torch.randint(0, dims["num_classes"], (batch,), generator=g)
    tokens = (dims["img_size"] // dims["patch_size"]) ** 2 + 1
    flops = 3 * vit_flops(dims["width"], dims["depth"], dims["mlp_dim"], tokens,
                          dims["in_chans"] * dims["patch_size"] ** 2, dims["num_classes"])  # fwd + 2x bwd

    def vitkit_model():
        torch.manual_seed(0)
        return vitkit.create_model(f"Ti/{dims['patch_size']}", **{k: v for k, v in dims.items() if k != "patch_size"})

    def timm_model():
        torch.manual_seed(0)
        return VisionTransformer(img_size=dims["img_size"], patch_size=dims["patch_size"], in_chans=dims["in_chans"],
                                 num_classes=dims["num_classes"], embed_dim=dims["width"], depth=dims["depth"],
                                 num_heads=dims["heads"], mlp_ratio=dims["mlp_dim"] / dims["width"])

    def stepper(model, compiled: bool, bf16: bool):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        # each library compiled as its trainer compiles it: vitkit's with its activation budget
        # (vitkit/train/compile.py)
        compile_model = compile_for_training if isinstance(model, vitkit.ViT) else torch.compile
        forward = compile_model(model) if compiled else model

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = forward(images)
            F.cross_entropy(logits.float(), labels).backward()
            optimizer.step()
        return step

    contenders = {"timm fp32": stepper(timm_model(), False, False),
                  "vitkit fp32": stepper(vitkit_model(), False, False)}
    if with_bf16:
        contenders["timm bf16 autocast"] = stepper(timm_model(), False, True)
        contenders["vitkit bf16 autocast"] = stepper(vitkit_model(), False, True)
    if with_compile:
        precision = "bf16 autocast" if with_bf16 else "fp32"
        contenders[f"timm compile + {precision}"] = stepper(timm_model(), True, with_bf16)
        contenders[f"vitkit compile + {precision}"] = stepper(vitkit_model(), True, with_bf16)
    return contenders, images, labels, flops


# --- measurement --------------------------------------------------------------------------------------------------

def interleaved(contenders: dict, call, reps: int, min_seconds: float) -> dict[str, dict]:
    """Median seconds per call of each contender, measured in turn, `reps` rounds; plus its peak extra memory."""
    iterations = {}
    for name, run in contenders.items():  # warm-up (compiles) and the number of calls one measurement takes
        call(run)
        start = time.perf_counter()
        call(run)
        iterations[name] = max(1, round(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            start = time.perf_counter()
            for _ in range(iterations[name]):
                call(run)
            times[name].append((time.perf_counter() - start) / iterations[name])
    return {name: {"seconds": statistics.median(t), "all_seconds": t} for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Ti/16 and the Fashion-MNIST shape only, 3 repetitions")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="inference model sizes (default: all)")
    parser.add_argument("--no-ti224-training", action="store_true", help="leave out the Ti/16 @224 training shape")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default: 5, or 3 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime contenders")
    parser.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO contenders")
    parser.add_argument("--no-bf16", action="store_true",
                        help="leave out the contenders that compute in bf16, and compile the training steps in fp32 "
                             "instead of bf16 autocast (on a CPU without bf16 dot products bf16 runs emulated, several "
                             "times slower than fp32, and takes most of the run)")
    parser.add_argument("--accuracy", help="an inference_accuracy_*.json of benchmarks/inference_accuracy.py: the "
                        "raised goals then hold vitkit's auto mode only against runtime modes within the accuracy "
                        "bound there")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave glibc's allocator settings as they are (default: keep freed memory for reuse, "
                             "vitkit.allocator, as vitkit's command line does; every contender runs with it)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return _memory_child(args.memory_child)
    # One process-wide setting, made before any contender is built, so all of them run with it alike.
    allocator_setting = (
        "glibc's defaults" if args.system_allocator or not allocator.keep_freed_memory() else
        f"freed memory kept for reuse (vitkit.allocator: mmap threshold {allocator.MMAP_THRESHOLD >> 20} MiB, "
        f"trim threshold {allocator.TRIM_THRESHOLD >> 20} MiB), for every contender alike")
    onnx_missing = None if args.no_onnx else onnx_unavailable()
    if onnx_missing:
        print(f"ONNX Runtime contenders left out: {onnx_missing}", flush=True)
    with_onnx = not args.no_onnx and onnx_missing is None
    openvino_missing = None if args.no_openvino else openvino_unavailable()
    if openvino_missing:
        print(f"OpenVINO contenders left out: {openvino_missing}", flush=True)
    with_openvino = not args.no_openvino and openvino_missing is None
    reps = args.reps or (3 if args.quick else 5)
    sizes = args.sizes or (["Ti/16"] if args.quick else list(SIZES))
    started = datetime.now(timezone.utc)
    record = {"benchmark": "CPU speed: vitkit vs timm, HF transformers, vit-pytorch",
              **provenance(started),
              "repetitions": reps, "allocator": allocator_setting,
              "onnxruntime": _onnx_runtime_setting(args.no_onnx, onnx_missing),
              "openvino": _openvino_setting(args.no_openvino, openvino_missing), "inference": [], "training": []}
    ceiling = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16),
               "int8": matmul_ceiling(torch.int8)}
    ceiling = {k: v for k, v in ceiling.items() if v is not None}  # no bf16 ceiling where bf16 is emulated
    record["matmul_gflops"] = {k: round(v, 1) for k, v in ceiling.items()}
    record["int8_ceiling_kernel"] = "torch._int_mm" if cpu_has_vnni() else "fbgemm's dynamic linear"
    shown = ", ".join(f"{k} {v:.0f} G{'OP' if k == 'int8' else 'FLOP'}/s" for k, v in ceiling.items())
    print(f"matmul ceiling: {shown} (int8 by {record['int8_ceiling_kernel']})", flush=True)

    for size in sizes:
        _, width, depth, _, mlp = SIZES[size]
        flops = vit_flops(width, depth, mlp, 197, 3 * 16 * 16, 1000)
        for batch in (1, 16):
            # Built afresh for each batch size, so compiled contenders are specialised to it. Dynamo's caches are
            # cleared first: every model shares one forward code object, and after 8 compilations of it (the
            # recompile limit) torch would silently run later "compiled" contenders eagerly.
            torch._dynamo.reset()
            contenders, differences, auto = inference_contenders(size, not args.no_compile, with_onnx, with_openvino,
                                                                 batch, with_bf16=not args.no_bf16)
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))

            def call(run, x=x):
                with torch.inference_mode():
                    run(x)
            measured = interleaved(contenders, call, reps, min_seconds=1.0)
            if batch == 16:  # memory of the compiled contenders would be mostly the compiler's
                for name in measured:
                    measured[name]["peak_extra_bytes"] = (
                        None if "compile" in name else memory_in_fresh_process("inference", size, batch, name))
            rows = _rows(measured, batch, flops, ceiling, differences)
            record["inference"].append({"model": size, "batch": batch, "gflops_per_image": round(flops / 1e9, 3),
                                        "rows": rows, "auto": auto})
            print(f"vitkit --precision auto at batch {batch}: {describe_auto(auto)}", flush=True)
            _print_table(f"inference {size} @224, batch {batch}", rows)
            del contenders

    # The default recipe's batch (configs/fashion_mnist.yaml).
    shapes = [("fashion-mnist default", 128)] + ([] if args.quick or args.no_ti224_training else [("Ti/16 @224", 32)])
    for shape, batch in shapes:
        torch._dynamo.reset()
        contenders, images, labels, flops = training_contenders(shape, batch, not args.no_compile,
                                                                with_bf16=not args.no_bf16)
        measured = interleaved(contenders, lambda step: step(), reps, min_seconds=2.0)
        for name in measured:  # compiling the 224-pixel training graphs again only for memory takes too long
            skip = "compile" in name and shape != "fashion-mnist default"
            measured[name]["peak_extra_bytes"] = (
                None if skip else memory_in_fresh_process("training", shape, batch, name))
        rows = _rows(measured, batch, flops, ceiling, {})
        record["training"].append({"shape": shape, "batch": batch, "gflops_per_image": round(flops / 1e9, 4),
                                   "rows": rows})
        _print_table(f"training {shape}, batch {batch}", rows)
    if args.accuracy:
        record["accuracy"] = accuracy_bound(Path(args.accuracy))
    record["goals"] = goal_checks(record)
    for c in record["goals"]:
        print(f"{'met' if c['met'] else 'NOT met'}: {c['goal']} ({c['measured']})", flush=True)
    _write(record, Path(args.out), started)
    return 0


def _onnx_runtime_setting(left_out: bool, missing: str | None) -> str:
    """What the record says of the ONNX Runtime contenders: its version and settings, or why they are absent."""
    if left_out:
        return "left out (--no-onnx)"
    if missing:
        return f"left out: {missing}"
    import onnxruntime as ort

    return (f"onnxruntime {ort.__version__}, CPUExecutionProvider, {torch.get_num_threads()} intra-op threads, "
            "1 inter-op, ORT_ENABLE_ALL; opset 18 export of the vitkit model, int8 by dynamic quantisation"
            + ("" if cpu_has_vnni() else " with 7-bit weights (reduce_range: no VNNI)"))


def _openvino_setting(left_out: bool, missing: str | None) -> str:
    """What the record says of the OpenVINO contenders: their versions and settings, or why they are absent."""
    if left_out:
        return "left out (--no-openvino)"
    if missing:
        return f"left out: {missing}"
    import nncf
    import openvino as ov

    return (f"openvino {ov.__version__} CPU plugin, {torch.get_num_threads()} inference threads, latency hint, "
            f"the opset 18 export made static for the batch; int8 by nncf {nncf.__version__} (transformer preset, "
            "random calibration images" + ("" if cpu_has_vnni() else ", overflow fix on every layer: no VNNI") + ")")


def _rows(measured: dict, batch: int, flops: float, ceiling: dict, differences: dict) -> list[dict]:
    base = batch / measured["timm fp32"]["seconds"]
    rows = []
    for name, m in measured.items():
        images_per_s = batch / m["seconds"]
        precision = "int8" if "int8" in name else "bf16" if "bf16" in name else "fp32"
        memory = m.get("peak_extra_bytes") or {}
        rows.append({"contender": name, "images_per_s": round(images_per_s, 2),
                     "vs_timm_fp32": round(images_per_s / base, 2),
                     "ceiling_fraction": (round(flops * images_per_s / (ceiling[precision] * 1e9), 3)
                                          if precision in ceiling else None),
                     "ceiling": precision, "peak_extra_mb": _mb(memory.get("warm")),
                     "peak_extra_mb_first_call": _mb(memory.get("first")),
                     "max_logit_difference": differences.get(name)})
    return rows


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _table(title: str, rows: list[dict]) -> list[str]:
    lines = [f"### {title}", "", "| contender | images/s | vs timm fp32 | of matmul ceiling | peak extra MB, warm "
             "(first call) | max logit diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["max_logit_difference"] is None else f"{r['max_logit_difference']:.2e}"
        memory = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']} ({r['peak_extra_mb_first_call']})"
        lines.append(f"| {r['contender']} | {r['images_per_s']:.1f} | {r['vs_timm_fp32']:.2f}x | "
                     + ("- (bf16 emulated)" if r["ceiling_fraction"] is None
                        else f"{100 * r['ceiling_fraction']:.0f}% ({r['ceiling']})") + f" | {memory} | {diff} |")
    return lines + [""]


def goal_checks(record: dict) -> list[dict]:
    """The speed issue's acceptance goals, checked against this run's figures (where the run has them)."""
    checks = []

    def check(goal: str, value: str, met: bool) -> None:
        checks.append({"goal": goal, "measured": value, "met": bool(met)})

    for entry in record["inference"]:
        if (entry["model"], entry["batch"]) != ("S/16", 16):
            continue
        rows = {r["contender"]: r for r in entry["rows"]}
        fastest = max((r for r in entry["rows"] if r["contender"].startswith("vitkit")),
                      key=lambda r: r["images_per_s"])
        check("S/16 @224 batch 16: fastest vitkit mode >= 2.5x timm fp32",
              f"{fastest['contender']}: {fastest['vs_timm_fp32']:.2f}x", fastest["vs_timm_fp32"] >= 2.5)
        if "bf16" in record["matmul_gflops"]:  # none where bf16 is emulated
            of_bf16 = entry["gflops_per_image"] * fastest["images_per_s"] / record["matmul_gflops"]["bf16"]
            check("S/16 @224 batch 16: fastest vitkit mode >= 75% of the bf16 matmul ceiling",
                  f"{fastest['contender']}: {100 * of_bf16:.1f}%", of_bf16 >= 0.75)
        if "vitkit fp32" in rows:
            ratio = rows["vitkit fp32"]["vs_timm_fp32"]
            check("S/16 @224 batch 16: vitkit fp32 >= 1.0x timm fp32", f"{ratio:.2f}x", ratio >= 1.0)
    for entry in record["inference"]:
        if entry["model"] != "S/16":
            continue
        within = set(record["accuracy"]["within_bound"]) if record.get("accuracy") else None
        checks.extend(runtime_goal_checks(entry, record["matmul_gflops"], within))
    for entry in record["training"]:
        if entry["shape"] != "fashion-mnist default":
            continue
        # One vitkit configuration has to meet all three: speed against both timm baselines, and memory.
        rows = {r["contender"]: r for r in entry["rows"]}
        # timm's one compiled step: in bf16 autocast, or in fp32 where the run left bf16 out (training_contenders).
        compiled_name = next((n for n in rows if n.startswith("timm compile + ")), "timm compile + bf16 autocast")
        compiled = rows.get(compiled_name)
        timm_memory = {n: r["peak_extra_mb"] for n, r in rows.items()
                       if n.startswith("timm") and r["peak_extra_mb"] is not None}
        lowest = min(timm_memory, key=timm_memory.get) if timm_memory else None
        for r in entry["rows"]:
            if not r["contender"].startswith("vitkit") or r["contender"] == "vitkit fp32":
                continue
            vs_compiled = r["images_per_s"] / compiled["images_per_s"] if compiled else None
            memory = r["peak_extra_mb"]
            memory_ok = lowest is not None and memory is not None and memory <= timm_memory[lowest]
            measured = (f"{r['vs_timm_fp32']:.2f}x timm fp32, "
                        + (f"{vs_compiled:.2f}x {compiled_name}, " if vs_compiled else "")
                        + f"warm peak {r['peak_extra_mb']} MB"
                        + (f" vs {lowest} {timm_memory[lowest]} MB" if lowest else ""))
            check(f"Fashion-MNIST training, {r['contender']}: >= 1.5x timm fp32, >= 1.1x {compiled_name}, warm "
                  "peak memory <= every timm contender's", measured,
                  r["vs_timm_fp32"] >= 1.5 and vs_compiled is not None and vs_compiled >= 1.1 and memory_ok)
    return checks


RUNTIMES = ("onnxruntime", "openvino")
"""The deployment runtimes vitkit's modes are held against (the exported model's contenders)."""


def accuracy_bound(path: Path) -> dict:
    """Which contenders kept the accuracy bound in an inference_accuracy_*.json: vitkit's modes named as here
    ("vitkit int8"), the runtimes' as they are."""
    try:
        record = json.loads(path.read_text())
        rows = record["modes"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"--accuracy {path}: not a results file of benchmarks/inference_accuracy.py ({err})")
    within = [row["mode"] if row["mode"].startswith(RUNTIMES) else f"vitkit {row['mode']}"
              for row in rows if row["meets_goals"]]
    return {"file": str(path), "within_bound": within}


def runtime_goal_checks(entry: dict, ceiling: dict, within_bound: set[str] | None = None) -> list[dict]:
    """The raised goals for one inference entry (model and batch): vitkit's `auto` mode >= 1.2x the fastest runtime
    mode at no larger accuracy cost (with `within_bound`, the contenders that kept the accuracy bound: only those
    runtime modes count, and auto's mode must be one of them), vitkit fp32 >= the fastest runtime fp32, and
    vitkit's fastest mode >= 75% of the matmul ceiling of its number format (bf16 or int8)."""
    where = f"{entry['model']} @224 batch {entry['batch']}"
    rows = {r["contender"]: r for r in entry["rows"]}
    runtimes = [r for r in entry["rows"] if r["contender"].startswith(RUNTIMES)
                and (within_bound is None or r["contender"] in within_bound)]
    checks = []
    auto = entry.get("auto")
    if runtimes and auto and f"vitkit {auto['precision']}" in rows:
        best = max(runtimes, key=lambda r: r["images_per_s"])
        ours = rows[f"vitkit {auto['precision']}"]
        ratio = ours["images_per_s"] / best["images_per_s"]
        bound = "" if within_bound is None else " within the accuracy bound"
        kept = within_bound is None or f"vitkit {auto['precision']}" in within_bound
        checks.append({"goal": f"{where}: vitkit auto >= 1.2x the fastest ONNX Runtime / OpenVINO mode{bound}",
                       "measured": f"auto = {auto['precision']} {ours['images_per_s']:.1f} images/s, "
                                   f"{ratio:.2f}x {best['contender']} {best['images_per_s']:.1f}"
                                   + ("" if kept else f"; vitkit {auto['precision']} is outside the bound"),
                       "met": ratio >= 1.2 and kept})
    calibrated = [r for name, r in rows.items() if name.startswith("vitkit int8 calibrated")
                  and (within_bound is None or name in within_bound)]
    if runtimes and calibrated:  # what a deployer who calibrates, as OpenVINO's int8 needs, gets from vitkit
        best = max(runtimes, key=lambda r: r["images_per_s"])
        ours = max(calibrated, key=lambda r: r["images_per_s"])
        ratio = ours["images_per_s"] / best["images_per_s"]
        checks.append({"goal": f"{where}: vitkit int8 calibrated (--int8_calibration) >= 1.2x the fastest ONNX Runtime "
                               "/ OpenVINO mode" + ("" if within_bound is None else " within the accuracy bound"),
                       "measured": f"{ours['contender']} {ours['images_per_s']:.1f} images/s, {ratio:.2f}x "
                                   f"{best['contender']} {best['images_per_s']:.1f}", "met": ratio >= 1.2})
    runtime_fp32 = [r for r in runtimes if r["contender"].endswith("fp32")]
    # vitkit's fp32 as a user runs it: eagerly or compiled (`--compile`), whichever is the faster.
    our_fp32 = [r for name, r in rows.items() if name in ("vitkit fp32", "vitkit fp32 + compile")]
    if runtime_fp32 and our_fp32:
        best = max(runtime_fp32, key=lambda r: r["images_per_s"])
        ours = max(our_fp32, key=lambda r: r["images_per_s"])
        ratio = ours["images_per_s"] / best["images_per_s"]
        checks.append({"goal": f"{where}: vitkit fp32 (eager or compiled) >= the fastest runtime fp32",
                       "measured": f"{ours['contender']}: {ratio:.2f}x {best['contender']}", "met": ratio >= 1.0})
    ours = [r for r in entry["rows"] if r["contender"].startswith("vitkit") and r["ceiling"] in ("bf16", "int8")
            and r["ceiling"] in ceiling]
    if ours and "int8" in ceiling:
        fastest = max(ours, key=lambda r: r["images_per_s"])
        fraction = entry["gflops_per_image"] * fastest["images_per_s"] / ceiling[fastest["ceiling"]]
        checks.append({"goal": f"{where}: fastest vitkit mode >= 75% of its matmul ceiling (bf16 or int8)",
                       "measured": f"{fastest['contender']}: {100 * fraction:.1f}% of the {fastest['ceiling']} "
                                   f"ceiling {ceiling[fastest['ceiling']]}", "met": fraction >= 0.75})
    return checks


def _print_table(title: str, rows: list[dict]) -> None:
    print("\n".join(_table(title, rows)), flush=True)


def _write(record: dict, out: Path, started: datetime) -> None:
    base = result_base(out, "speed", started)
    write_json(record, base)
    lines = ["# CPU speed: vitkit vs timm, HF transformers and vit-pytorch", "",
             *header_lines(record),
             f"- matmul ceiling (2048^3, median): fp32 {record['matmul_gflops']['fp32']} GFLOP/s, "
             + (f"bf16 {record['matmul_gflops']['bf16']} GFLOP/s" if "bf16" in record["matmul_gflops"]
                else "no bf16 (emulated on this CPU)")
             + (f", int8 {record['matmul_gflops']['int8']} GOP/s "
                f"({record.get('int8_ceiling_kernel', 'torch._int_mm')})" if "int8" in record["matmul_gflops"]
                else ""),
             f"- allocator (speed figures): {record.get('allocator', 'not recorded')}",
             f"- ONNX Runtime: {record.get('onnxruntime', 'not measured')}",
             f"- medians of {record['repetitions']} interleaved repetitions; 'peak extra MB' is how far the process's "
             "peak resident set rose above its size over two calls after a first one, and in brackets over the first "
             "call, which includes compilation (in a fresh process, glibc mmap threshold "
             f"{MMAP_THRESHOLD // 1024} KiB); logit differences are against "
             "vitkit fp32 with the same weights (HF: against vitkit loaded from HF's weights)", ""]
    if record.get("goals"):
        lines += ["### Goals of the speed issue", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {c['goal']} | {c['measured']} | {'yes' if c['met'] else 'NO'} |" for c in record["goals"]]
        lines.append("")
    for entry in record["inference"]:
        lines += _table(f"Inference {entry['model']} @224, batch {entry['batch']} "
                        f"({entry['gflops_per_image']} GFLOP/image)", entry["rows"])
        if entry.get("auto"):
            lines[-1:-1] = [f"vitkit `--precision auto` here: {describe_auto(entry['auto'])}", ""]
    for entry in record["training"]:
        lines += _table(f"Training step, {entry['shape']}, batch {entry['batch']} "
                        f"({entry['gflops_per_image']} GFLOP/image fwd+bwd)", entry["rows"])
    base.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
