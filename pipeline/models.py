"""Teachers and students by name, weight fingerprints, and capturing module outputs by dotted path.

Model specs (teachers and students alike):
- `default-teacher`   small ResNet-style CNN (`TeacherNet`), trained by `make teacher` into data/teachers/default.pt
- `default-student`   small CNN (`StudentNet`): two conv blocks, an embedding, a classifier
- `mlp`               one hidden layer MLP
- `torchvision:NAME`  any torchvision classification architecture, built without weights (`--weights FILE` loads yours)
- `module:function`   your own: `function(num_classes=..., in_channels=..., image_size=H, image_shape=(H, W))` (only
  the kwargs it accepts) -> nn.Module
Nothing downloads weights at run time.

Module outputs are named by their dotted module path (`layer2`, `features.3`): the same string is the hook key, the
Zarr array name (`features/layer2`) and the loss input, so one name follows a tensor everywhere.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import KDCacheError, first_line


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TeacherNet(nn.Module):
    """ResNet-style CNN for small images; module names follow torchvision's ResNet (layer1..3, avgpool, fc)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = BasicBlock(w, w)
        self.layer2 = BasicBlock(w, 2 * w, stride=2)
        self.layer3 = BasicBlock(2 * w, 4 * w, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class StudentNet(nn.Module):
    """Small CNN student: block1 (16ch, /2), block2 (32ch, /4), embed (64-d), fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28,
                 image_shape: tuple[int, int] | None = None):
        super().__init__()
        self.block1 = _conv_block(in_channels, width)
        self.block2 = _conv_block(width, 2 * width)
        h, w = (max(1, v // 4) for v in (image_shape or (image_size, image_size)))
        self.pool = nn.AdaptiveAvgPool2d((h, w))  # fixes the embed input for any image size
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * h * w, 64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.embed(self.pool(self.block2(self.block1(x)))))


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 256,
                 image_shape: tuple[int, int] | None = None):
        super().__init__()
        h, w = image_shape or (image_size, image_size)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * h * w, hidden), nn.ReLU(inplace=True))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.hidden(x))


BUILTIN = {"default-teacher": TeacherNet, "default-student": StudentNet, "mlp": MLP}


def _call_with_accepted(fn, **kwargs):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def build_model(spec: str, num_classes: int, in_channels: int, image_size: int | Sequence[int]) -> nn.Module:
    """Construct an architecture by spec with random weights, for inputs of `image_size`: a side, or [H, W] (a
    transform's size: image folders are as wide as their first image, not square)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(v) for v in image_size)
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=h, image_shape=(h, w))
    if spec in BUILTIN:
        return _call_with_accepted(BUILTIN[spec], **kwargs)
    kind, _, name = spec.partition(":")
    if kind == "torchvision" and name:
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError:
            raise KDCacheError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()") from None
    if kind and name:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # a user's models.py beside them, as `python -m pipeline` would find it
        try:
            fn = getattr(importlib.import_module(kind), name)
        except (ImportError, AttributeError) as e:
            raise KDCacheError(f"cannot import model '{spec}' ({e}); use module:function with the module in the "
                               "current folder or on PYTHONPATH") from None
        except Exception as e:  # noqa: BLE001 - the user's module fails as it loads (a SyntaxError, its own raise)
            raise KDCacheError(f"cannot import model '{spec}': importing module '{kind}' raised {type(e).__name__}: "
                               f"{first_line(e)}") from None
        try:
            model = _call_with_accepted(fn, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's code: say whose it is, in one line
            raise KDCacheError(f"'{spec}' raised {type(e).__name__} while building the model: {first_line(e)}"
                               ) from None
        if not isinstance(model, nn.Module):
            raise KDCacheError(f"'{spec}' returned {type(model).__name__}, not an nn.Module")
        return model
    raise KDCacheError(f"unknown model '{spec}'; use {', '.join(BUILTIN)}, torchvision:NAME or module:function")


def default_teacher_weights() -> Path:
    from pipeline.data import data_root

    return data_root() / "teachers" / "default.pt"


def missing_weights(path, data: str | None = None) -> KDCacheError:
    """The one line for a weights file that is not there; for the default teacher, how to get one: `make teacher`
    trains it on Fashion-MNIST, which for other `data` is not the teacher wanted (nor fits it)."""
    hint = ""
    if Path(path).absolute() == default_teacher_weights().absolute():
        hint = (" (run `make teacher` to train the default teacher)" if not data or data.startswith("fashion-mnist")
                else f" (the default teacher; `make teacher` trains it on Fashion-MNIST); for {data} pass --weights "
                     f"FILE of your own teacher, or train one with `kdcache teacher --data {data} --out FILE`")
    return KDCacheError(f"weights file not found: {path}{hint}")


def load_checkpoint(path: Path) -> dict:
    """A weights file: either our checkpoint dict ({'state_dict', 'arch', ...}) or a bare state_dict."""
    if not Path(path).exists():
        raise missing_weights(path)
    if Path(path).is_dir():  # (torch.load's IsADirectoryError said nothing of what to pass instead)
        raise KDCacheError(f"{path} is a folder, not a weights file; pass the file itself (a teacher's .pt, or a "
                           "run's student.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDCacheError(f"cannot load weights from {path}: {type(e).__name__}; pass a torch state_dict file") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        meta = ckpt.get("meta")
        if isinstance(meta, dict) and "transform" in meta:  # the input the model was trained on, fed to it again
            from pipeline.data import Transform

            problem = Transform.problem(meta["transform"])
            if problem:
                raise KDCacheError(f"{path}: the transform its meta records {problem}; fix it or save the weights "
                                   "without one (then --image-size, --channels and --normalize say what to feed)")
        return ckpt
    if isinstance(ckpt, dict) and {"student", "opt", "epoch"} <= set(ckpt):
        # train-student's checkpoint.pt: read as a bare state_dict, its keys (epoch, student, opt, ...) fitted no
        # model, and the error asked for a --model that could not help. It records neither the transform nor the
        # classes student.pt does, so it is named, with the way to its student.pt.
        raise KDCacheError(f"{path} is an unfinished train-student run's checkpoint (after epoch {ckpt['epoch']}), "
                           f"not a model's weights; finish the run (train-student --resume --out "
                           f"{Path(path).parent}) and use its student.pt")
    if isinstance(ckpt, dict):
        return {"state_dict": ckpt}
    raise KDCacheError(f"{path} holds a {type(ckpt).__name__}, not a state_dict")


def teacher_classes(meta: dict) -> list[str] | None:
    """The class names a weights file's meta records (`kdcache teacher` and student.pt do), else None."""
    classes = meta.get("classes") or (meta.get("data") or {}).get("classes")
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None


def classifier_width(state_dict: dict) -> int | None:
    """Outputs (dim 0) of the last classifier-shaped weight in a state_dict (whose order is the modules'): a 2-D
    Linear weight, or a 4-D 1x1 convolution's, the classifier of conv-only nets such as torchvision's SqueezeNet
    (`classifier.1`, a 1x1 Conv2d), which has no 2-D weight at all. In torchvision's models (`fc`, `classifier.N`,
    `heads.head`) and most others the classifier is registered last, so the 1x1 convolutions before it (ResNet's
    downsampling, MobileNet's pointwise and squeeze-excitation layers) do not count. Lets a teacher run on
    unlabelled data, whose classes say nothing about its output count. None when no weight has either shape."""
    if not isinstance(state_dict, dict):
        return None
    mats = [v for k, v in state_dict.items() if str(k).endswith("weight") and isinstance(v, torch.Tensor) and (
        v.ndim == 2 or (v.ndim == 4 and tuple(v.shape[2:]) == (1, 1)))]
    return int(mats[-1].shape[0]) if mats else None


def load_teacher(spec: str, weights: Path | None, num_classes: int | None, in_channels: int,
                 image_size: int | Sequence[int], recorded_size: bool = True, data: str | None = None
                 ) -> tuple[nn.Module, dict]:
    """Build the teacher and load its weights. Only the teacher-cache stage (and `verify`) may call this.
    `recorded_size`: the image size the file's transform records (the input the teacher is fed, unless --image-size
    says otherwise) builds it, not `image_size`: an architecture sized by its input (`mlp`, `default-student`, a
    module:function using image_size) trained with `kdcache teacher --image-size` fits its weights only at that size.
    `data`: the spec it is to run on, for the way to a teacher of one's own when the default one is missing."""
    if weights is None:
        if spec != "default-teacher":
            raise KDCacheError(f"teacher '{spec}' needs --weights FILE (kdcache never downloads weights)")
        weights = default_teacher_weights()
    if not Path(weights).exists():  # said with the data it was to run on (load_model's check knows no data)
        raise missing_weights(weights, data)
    return load_model(spec, Path(weights), num_classes, in_channels, image_size, recorded_size=recorded_size,
                      fix="check --teacher and --weights, and that the data has the classes and channels the teacher "
                          "was trained on (--num-classes, --channels)", arch_flag="--teacher")


def load_model(spec: str, weights: Path, num_classes: int | None, in_channels: int, image_size: int | Sequence[int],
               fix: str = "check --model and --weights", arch_flag: str = "--model", recorded_size: bool = False
               ) -> tuple[nn.Module, dict]:
    """Build `spec` and load a weights file into it, in eval mode: (model, the file's meta). The file's meta
    (num_classes, in_channels), when it has one, wins over the arguments; without either, the output count is read
    off the weights (`classifier_width`). Weights that do not fit `spec` but record another architecture (as
    `kdcache teacher` and student.pt do) get that one named, with `arch_flag`, the flag that chooses it.
    `recorded_size`: the size the file's transform records, when it records one, wins over `image_size`."""
    ckpt = load_checkpoint(weights)
    meta = ckpt.get("meta", {})
    try:
        num_classes = int(meta.get("num_classes") or num_classes or classifier_width(ckpt["state_dict"]) or 1000)
        in_channels = int(meta.get("in_channels", in_channels))
        if recorded_size and isinstance(meta.get("transform"), dict):  # load_checkpoint checked it
            image_size = [int(v) for v in meta["transform"]["size"]]
    except (TypeError, ValueError, AttributeError):
        raise KDCacheError(f"{weights}: its meta (num_classes, in_channels) is not a pair of numbers; save the "
                           "weights as a state_dict or as {'state_dict': ..., 'meta': {...}}") from None
    model = build_model(spec, num_classes, in_channels, image_size)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        recorded = meta.get("arch")
        if isinstance(recorded, str) and recorded and recorded != spec:
            fix = f"the file records its architecture as '{recorded}': pass {arch_flag} {recorded}"
        raise KDCacheError(f"weights in {weights} do not fit '{spec}' ({first_misfit(e)}); {fix}") from None
    return model.eval(), meta


def first_misfit(e: BaseException) -> str:
    """The first specific reason in load_state_dict's message (its first line is only a header), shortened."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    reason = next((x for x in lines[1:] if not x.endswith(":")), lines[0] if lines else type(e).__name__)
    return reason if len(reason) <= 240 else reason[:237] + "..."


class Outputs(dict):
    """Hooked outputs by module path, plus how often each module ran: a module the forward calls more than once
    (torchvision's BasicBlock reuses one ReLU) would silently give its last call, so `check_outputs` refuses it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.first_of: dict[str, str] = {}  # name -> the type of the tuple/list output whose first element it holds

    def put(self, name: str, t: torch.Tensor) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self[name] = t


def _output_tensor(out) -> torch.Tensor | None:
    """The tensor a hooked module gave: its output, or the first element of a tuple/list output; None otherwise."""
    t = out[0] if isinstance(out, (tuple, list)) and out else out
    return t if isinstance(t, torch.Tensor) else None


def probe_forward(model: nn.Module, names: list[str], x: torch.Tensor):
    """One forward on `x` (in the model's current train/eval mode): (its output, {name: module output, by reference},
    the names whose output a later in-place operation changed), the last found by the tensors' version counters:
    `capture` must copy those. Runs under no_grad, not inference_mode, whose tensors keep no version counter."""
    at_hook, versions = Outputs(), {}
    handles = []
    for name, mod in resolve_modules(model, names).items():
        def hook(_m, _inp, out, name=name):
            t = _output_tensor(out)
            if t is not None:  # anything else: `check_outputs` names it
                at_hook.put(name, t)
                versions[name] = t._version
                if isinstance(out, (tuple, list)):
                    at_hook.first_of[name] = f"{type(out).__name__} of {len(out)}"
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, at_hook, {n for n, t in at_hook.items() if t._version != versions[n]}


def forward_in_training_mode(model: nn.Module, x: torch.Tensor):
    """`model`'s output on `x` as training computes it (training mode, no grad), for a probe before training:
    some forwards differ there (torchvision's GoogLeNet and Inception v3 add their auxiliary heads' outputs).
    Leaves the model's buffers (BatchNorm statistics) and the random numbers (dropout draws) as they were; lazy
    buffers not made yet are made here. The forward's own exceptions propagate, for the caller to name."""
    before = {k: b.clone() for k, b in model.named_buffers() if not isinstance(b, nn.parameter.UninitializedBuffer)}
    # Only the input's GPU: forking every GPU's generator would open a context on each (from every rank).
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
            return model.train()(x)
    finally:
        for k, b in model.named_buffers():
            if k in before:
                b.copy_(before[k])


def refuse_untrainable(model: nn.Module, model_name: str) -> None:
    """A model without a trainable parameter is one line before training, not the optimizer's (or the first
    backward's) traceback."""
    if not any(p.requires_grad for p in model.parameters()):
        raise KDCacheError(f"{model_name} has no trainable parameters, so there is nothing to train; give an "
                           "architecture with weights")


def forward_failed(model_name: str, x: torch.Tensor, e: BaseException) -> KDCacheError:
    """The one-line error for a model that raises on the data's input (e.g. a 3-channel torchvision model on
    grayscale images): the input's shape, the model's own first line, and the flags that change the input."""
    return KDCacheError(f"{model_name} fails on this data's {tuple(x.shape[1:])} input ({type(e).__name__}: "
                        f"{first_line(e)}); set --channels and --image-size to what it expects")


def check_logits(model_name: str, out) -> None:
    """A classifier's forward must return one (batch, classes) tensor: a tuple (an auxiliary head beside the
    scores) or a feature map can be neither trained with cross-entropy nor cached as logits."""
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise KDCacheError(f"{model_name} returns {what}, not logits of shape (batch, classes); wrap it in a "
                           "module:function that returns the class scores")


def check_outputs(model_name: str, names: list[str], feats: dict, flag: str) -> None:
    """Every named module must have given a tensor during the probe forward: a module that exists but that the
    forward never calls (an auxiliary head, unused in eval mode), or that returns no tensor, cannot be cached or
    matched."""
    missing = [n for n in names if n not in feats]
    if missing:
        raise KDCacheError(f"module '{missing[0]}' of {model_name} gave no tensor during a forward (the forward does "
                           f"not call it, or it returns no tensor); choose another {flag}")
    repeated = [n for n in names if getattr(feats, "calls", {}).get(n, 1) > 1]
    if repeated:
        n = repeated[0]
        parent = n.rpartition(".")[0]
        raise KDCacheError(f"module '{n}' of {model_name} runs {feats.calls[n]} times in one forward (one module "
                           f"reused, e.g. a block's shared ReLU), so its output is ambiguous; choose another {flag}"
                           + (f", e.g. its parent '{parent}'" if parent else ""))


def fingerprint_module(model: nn.Module, params_only: bool = False) -> str:
    """sha256 over the state_dict (names, shapes, dtypes and bytes): identifies the weights, not the file.
    `params_only`: the trainable parameters alone (not buffers such as BatchNorm's running statistics)."""
    h = hashlib.sha256()
    items = dict(model.named_parameters()) if params_only else model.state_dict()
    for k, v in sorted(items.items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_modules(model: nn.Module, names: list[str], flag: str = "") -> dict[str, nn.Module]:
    """Map dotted paths to modules; an unknown path is an error listing the nearest valid ones (and the `flag`
    that named it)."""
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        if not n:
            raise KDCacheError(f"an empty module path names the whole {type(model).__name__}; name a layer, e.g. "
                               f"{', '.join([k for k in modules if k][:3])}")
        if n not in modules:
            near = difflib.get_close_matches(n, [k for k in modules if k], n=5, cutoff=0.3)
            top = [k for k in modules if k and "." not in k]  # nothing alike: say what there is
            listed = (f"nearest: {', '.join(near)}" if near else
                      f"its top-level modules: {', '.join(top[:12]) or 'none'} (dotted paths name deeper ones)")
            raise KDCacheError(f"no module '{n}' in {type(model).__name__}{f' (from {flag})' if flag else ''}; "
                               f"{listed}")
        out[n] = modules[n]
    return out


class StopForward(Exception):
    """Raised by `stop_after` once its module has run: the rest of the forward is not needed."""


@contextmanager
def stop_after(model: nn.Module, name: str | None):
    """Cut every forward short right after module `name` (None: no cut). FitNets' hint stage trains the student up
    to its guided layer only: the layers after it neither run (no compute spent) nor update their BatchNorm
    statistics, as in Romero et al.'s stage 1. Hooks registered before this one (`capture`'s) still run."""
    if name is None:
        yield
        return

    def hook(_m, _inp, _out):
        raise StopForward

    handle = resolve_modules(model, [name])[name].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, names: list[str], copy=None):
    """Forward hooks that store each named module's output in the yielded dict (keyed by the dotted path).

    The next module may change an output in place (torchvision's ResNets follow `bn1` with `ReLU(inplace=True)`,
    and add the shortcut into `bn2`'s output with `+=`), and the module's output is what was asked for: the outputs
    named in `copy` are stored as copies (differentiable, so hooked student layers still train); `copy=None` copies
    all of them. `probe_forward` finds which need it, so a teacher copies none it does not have to."""
    outputs = Outputs()
    handles = []
    for name, mod in resolve_modules(model, names).items():
        def hook(_m, _inp, out, name=name, clone=copy is None or name in copy):
            t = _output_tensor(out)
            if t is not None:  # anything else: absent, and `check_outputs` names it
                outputs.put(name, t.clone() if clone else t)
        handles.append(mod.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
