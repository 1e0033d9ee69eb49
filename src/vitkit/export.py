"""`vitkit export`: weights of any format vitkit reads, written as ONNX, the official .npz layout or vitkit
.safetensors.

ONNX goes through torch.onnx's exporter (torch.export underneath) with a dynamic batch and, with `dynamic`, a
dynamic image height and width: the bicubic resampling of the position embedding's grid is then part of the
graph, so one file serves every size the patch divides. Before anything is put in place, ONNX Runtime runs the
file against the PyTorch model (the parity check). `int8` adds ONNX Runtime's dynamically quantised copy,
`<out stem>.int8.onnx`, and `data` measures how often its top-1 class agrees with the fp32 file's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from vitkit.data import Transformed, eval_transform, load_dataset
from vitkit.inference import load_for_inference, normalisation
from vitkit.model import ViT, check_image_size
from vitkit.runtime import cpu_has_vnni
from vitkit.weights import PREPROCESS_KEY, export_npz, save_weights

FORMATS = ("onnx", "npz", "safetensors")

PARITY_TOLERANCE = 1e-4
"""The largest max|onnx - torch| / max|torch| over a check's logits that passes."""

PARITY_BATCHES = (1, 3)

EXAMPLE_BATCH = 2
"""The batch the model is traced at: torch.export fixes a dimension whose example size is 0 or 1 (a grid side too)."""

RESIZE_ANTIALIAS_OPSET = 18
"""The first opset whose Resize antialiases, as the position embedding's resampling does."""

EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above this go to a `<file>.data` beside the .onnx: a protobuf (one .onnx file) holds at most 2 GB."""

INSTALL_HINT = "vitkit export --format onnx needs onnx, onnxruntime and onnxscript: pip install 'vitkit[export]'"


class ParityError(RuntimeError):
    """The ONNX model's logits differ from PyTorch's by more than PARITY_TOLERANCE."""


@dataclass
class ExportOptions:
    """Export weights to ONNX (checked in ONNX Runtime against PyTorch), the official .npz layout or .safetensors."""

    weights: str
    """Weights to export: a vitkit .safetensors file (as written by `vitkit train`), or timm, HF or official weights."""
    out: str
    """The file to write, named after the format: NAME.onnx, NAME.npz or NAME.safetensors."""
    format: Literal["onnx", "npz", "safetensors"] = "onnx"
    """onnx (an inference graph), npz (the official Flax layout) or safetensors (vitkit's, with the weights'
    preprocessing)."""
    dynamic: bool = False
    """ONNX: the image height and width are dynamic too (any multiple of the patch size; the position embedding is
    resampled inside the graph; needs opset 18 or later). The batch size always is. The graph does not check the
    size: the patch convolution crops one the patch does not divide."""
    opset: int = 18
    """ONNX opset version."""
    check: bool = True
    """ONNX: before writing, run the model in ONNX Runtime against PyTorch (fp32, random images at batch 1 and 3):
    the largest logit difference over the largest logit must stay below 1e-4, else nothing is written."""
    check_sizes: list[int] = field(default_factory=list)
    """With --dynamic: square image sizes the parity check runs at besides the export size (default: the export size
    plus two patches in height and width). Each must be a multiple of the patch size."""
    int8: bool = False
    """ONNX: also write ONNX Runtime's dynamically quantised model (int8 weights) as <out stem>.int8.onnx. On a CPU
    without VNNI its weights keep 7 bits, so that ONNX Runtime's int8 multiply-adds do not saturate there."""
    data: str | None = None
    """With --int8: measure the int8 model's top-1 agreement with the fp32 model on this dataset's test split
    (fashion-mnist, mnist-subset, digits, cifar10, cifar100, image-folder, synthetic)."""
    data_dir: str | None = None
    """Where the dataset's files are (default: the dataset's usual places)."""
    count: int = 2000
    """Test images the int8 agreement is measured on (fewer if the split has fewer)."""


def export_weights(opts: ExportOptions) -> Path:
    """Write the export `opts` asks for and return its path (the fp32 .onnx for ONNX)."""
    out = _checked_out(opts)
    model, preprocess = load_for_inference(opts.weights, torch.device("cpu"))
    if opts.format == "npz":
        path = export_npz(model, out)
    elif opts.format == "safetensors":
        metadata = {PREPROCESS_KEY: json.dumps(preprocess)} if preprocess else None
        path = save_weights(model, out, metadata)
    else:
        return _export_onnx_files(model, preprocess, out, opts)
    print(f"wrote {path} ({opts.format})")
    return path


def _checked_out(opts: ExportOptions) -> Path:
    """The output path, once the options are known to be coherent (before anything is loaded or written)."""
    if opts.format not in FORMATS:
        raise ValueError(f"unknown export format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if not opts.out:
        raise ValueError(f"--out is required: the file to write, e.g. model.{opts.format}")
    out = Path(opts.out)
    if out.suffix != f".{opts.format}":
        raise ValueError(f"--format {opts.format} writes a .{opts.format} file; --out {out} names a "
                         f"{out.suffix or 'suffix-less'} file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the file to write")
    onnx_only = {"--dynamic": opts.dynamic, "--int8": opts.int8, "--check_sizes": opts.check_sizes,
                 "--data": opts.data}
    if opts.format != "onnx" and any(onnx_only.values()):
        given = [name for name, value in onnx_only.items() if value]
        raise ValueError(f"{', '.join(given)} apply to --format onnx only")
    if opts.check_sizes and not opts.dynamic:
        raise ValueError("--check_sizes checks other image sizes, which only a --dynamic export takes")
    if opts.check_sizes and not opts.check:
        raise ValueError("--check_sizes needs the parity check (--check true)")
    if opts.data and not opts.int8:
        raise ValueError("--data measures the int8 model's agreement with fp32: add --int8")
    if opts.count < 1:
        raise ValueError(f"--count must be at least 1, got {opts.count}")
    if opts.opset < 1:
        raise ValueError(f"--opset must be a positive ONNX opset version, got {opts.opset}")
    if opts.dynamic and opts.opset < RESIZE_ANTIALIAS_OPSET:
        raise ValueError(f"--dynamic puts the position embedding's antialiased resampling into the graph (ONNX Resize "
                         f"with antialias, opset {RESIZE_ANTIALIAS_OPSET} on): use --opset {RESIZE_ANTIALIAS_OPSET} "
                         "or later")
    return out


def _export_onnx_files(model: ViT, preprocess: dict, out: Path, opts: ExportOptions) -> Path:
    cfg = model.cfg
    sizes = [tuple(cfg.img_size)]
    if opts.dynamic and opts.check:
        extra = [(s, s) for s in opts.check_sizes] or [(cfg.img_size[0] + 2 * cfg.total_stride,
                                                         cfg.img_size[1] + 2 * cfg.total_stride)]
        for size in extra:
            check_image_size(size, cfg.patch_size, "--check_sizes size", stem_stride=cfg.stem_stride)
        sizes += [s for s in extra if s not in sizes]
    int8_name = out.with_suffix("").name + ".int8.onnx"
    with _staged(out) as stage:
        fp32 = stage / out.name
        export_onnx(model, fp32, dynamic=opts.dynamic, opset=opts.opset)
        if opts.check:
            error = check_parity(model, fp32, sizes)
            shown = ", ".join(f"{h}x{w}" for h, w in sizes)
            print(f"parity (ONNX Runtime vs PyTorch fp32, opset {file_opset(fp32)}): sizes {shown}, batches "
                  f"{' and '.join(map(str, PARITY_BATCHES))}: max relative logit error {error:.2e} "
                  f"(limit {PARITY_TOLERANCE:.0e})")
        if opts.int8:
            quantise_int8(fp32, stage / int8_name, external_data=needs_external_data(model))
            if opts.data:
                mean, std = normalisation(preprocess, cfg.in_chans)
                images = dataset_batches(opts.data, opts.data_dir, cfg.img_size, cfg.in_chans, mean, std,
                                         opts.count)
                agreement, seen = int8_agreement(fp32, stage / int8_name, images)
                print(f"int8 top-1 agreement with fp32 on {opts.data} test: {100 * agreement:.2f}% ({seen} images)")
    print(f"wrote {out}" + (f" and {out.parent / int8_name}" if opts.int8 else "")
          + (" (dynamic batch, height and width)" if opts.dynamic else " (dynamic batch)"))
    return out


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A private directory beside `out` to write into; its files are moved next to `out` only when the block succeeds,
    the file named like `out` last. A directory and not one temporary file: an ONNX file may bring its weights in a
    second file that it names, and the int8 model comes with it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield stage
        for path in sorted(stage.iterdir(), key=lambda p: (p.name == out.name, p.name)):
            os.replace(path, out.parent / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_onnx(model: ViT, path: Path, *, dynamic: bool = False, opset: int = 18) -> None:
    """Write `model` (in eval mode) as ONNX: images (B, C, H, W) -> logits, B always dynamic, H and W if `dynamic`."""
    _require_onnx()
    if model.training:
        raise ValueError("export a model in eval mode (model.eval()): training mode would export dropout")
    cfg = model.cfg
    size = cfg.img_size
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic:
        # As multiples of the patch, so that the exporter knows the patch divides them (no guard on H % P) and the
        # grid is the symbolic H / P that the position embedding's resampling takes.
        dims[2] = cfg.total_stride * torch.export.Dim("grid_height", min=1)
        dims[3] = cfg.total_stride * torch.export.Dim("grid_width", min=1)
        # A grid side of 1 would be fixed like a batch of 1: trace at two patches or more.
        size = tuple(max(side, 2 * cfg.total_stride) for side in size)
    example = torch.randn(EXAMPLE_BATCH, cfg.in_chans, *size)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes={"x": dims}, opset_version=opset,
                                    input_names=["images"], output_names=["logits"], verbose=False)
    except Exception as err:  # the exporter's own errors are of many types; say which step failed
        raise RuntimeError(f"torch.onnx could not export the model (opset {opset}): {err}") from err
    program.save(str(path), external_data=needs_external_data(model))
    # When torch.onnx cannot convert its graph to the opset asked for, it warns and writes the graph's own opset.
    written = file_opset(path)
    if written != opset:
        raise RuntimeError(f"torch.onnx could not write the model in opset {opset} (it wrote opset {written}); "
                           f"choose --opset {written}")


def file_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def needs_external_data(model: ViT) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as err:
            raise RuntimeError(f"{INSTALL_HINT} ({err})") from err


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's concern
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_logits(model: ViT, images: torch.Tensor) -> np.ndarray:
    """PyTorch's fp32 logits for (B, C, H, W) images: what the ONNX model is checked against."""
    with torch.no_grad():
        return model(images).float().numpy()


def check_parity(model: ViT, path: Path, sizes: list[tuple[int, int]]) -> float:
    """The largest max|onnx - torch| / max|torch| over random images at each (H, W) of `sizes` and each batch of
    PARITY_BATCHES; ParityError if it reaches PARITY_TOLERANCE."""
    session = _session(path)
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for h, w in sizes:
        for batch in PARITY_BATCHES:
            images = torch.randn(batch, model.cfg.in_chans, h, w, generator=generator)
            expected = reference_logits(model, images)
            got = session.run(None, {name: images.numpy()})[0]
            # A model whose logits are all zero (an untrained zero head) passes only if ONNX gives zeros too.
            scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
            error = float(np.abs(got - expected).max()) / scale
            worst = max(worst, error)
            if not error < PARITY_TOLERANCE:
                raise ParityError(f"the ONNX model's logits differ from PyTorch's at {h}x{w}, batch {batch}: max "
                                  f"relative error {error:.2e} >= {PARITY_TOLERANCE:.0e}; nothing was written")
    return worst


def quantise_int8(src: Path, dst: Path, external_data: bool = False, reduce_range: bool | None = None) -> None:
    """ONNX Runtime's dynamic quantisation of `src` into `dst`: int8 weights (signed, QInt8, per output channel) of
    the matmuls by a constant, activations quantised per call. `reduce_range`: weights on 7 bits, which ONNX Runtime
    asks for on CPUs without VNNI, whose 8-bit multiply-adds saturate in 16 bits (on an AMD EPYC without VNNI a small
    random ViT's logits were off by 29% of their range with 8 bits, 4% with 7); None: 7 bits on such a CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ONNX Runtime's recommended first step (shape inference and graph optimisation) finds the same matmuls; its
    # optimised graph drops the exporter's duplicated constants, so the int8 file is smaller.
    prepared = dst.with_name(f".{dst.name}.prepared")
    try:
        quant_pre_process(src, prepared, save_as_external_data=external_data, all_tensors_to_one_file=True)
        # One weight scale per output channel, as vitkit's own int8 (inference_modes): on a Ti/4 Fashion-MNIST model
        # it lifted top-1 agreement with fp32 over 2000 test images from 98.15% (per tensor) to 98.50%.
        quantize_dynamic(prepared, dst, weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=not cpu_has_vnni() if reduce_range is None else reduce_range,
                         use_external_data_format=external_data)
    finally:
        for path in prepared.parent.glob(f"{prepared.name}*"):
            path.unlink()


def dataset_batches(data: str, data_dir: str | None, image_size: tuple[int, int], in_chans: int,
                    mean: tuple[float, ...], std: tuple[float, ...], count: int) -> Iterator[np.ndarray]:
    """Batches of the first `count` images of a dataset's test split, normalised as the weights expect."""
    options = {"test_size": count} if data == "synthetic" else {}
    splits = load_dataset(data, data_dir=data_dir, image_size=image_size, in_chans=in_chans, **options)
    test = Transformed(splits.test, eval_transform(mean, std, image_size))
    chosen = Subset(test, range(min(count, len(test))))
    for images, _ in DataLoader(chosen, batch_size=100):
        yield images.numpy()


def int8_agreement(fp32: Path, int8: Path, batches: Iterator[np.ndarray]) -> tuple[float, int]:
    """(the fraction of images whose top-1 class the two ONNX models agree on, the number of images)."""
    reference, quantised = _session(fp32), _session(int8)
    name = reference.get_inputs()[0].name
    agree = seen = 0
    for images in batches:
        a = reference.run(None, {name: images})[0].argmax(-1)
        b = quantised.run(None, {name: images})[0].argmax(-1)
        agree += int((a == b).sum())
        seen += len(images)
    if seen == 0:
        raise ValueError("the dataset's test split has no images to measure the int8 agreement on")
    return agree / seen, seen
