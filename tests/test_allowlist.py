"""The worker's allow-list: every name is real, of the right kind, and never dangerous."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.linalg
import torch.nn.functional

from torchrelay.broker import _allowlist

CALLABLE_SETS: dict[str, tuple[frozenset[str], Any]] = {
    "TENSOR_METHODS": (_allowlist.TENSOR_METHODS, torch.Tensor),
    "TORCH_FUNCTIONS": (_allowlist.TORCH_FUNCTIONS, torch),
    "FUNCTIONAL": (_allowlist.FUNCTIONAL, torch.nn.functional),
    "LINALG": (_allowlist.LINALG, torch.linalg),
}

ALL_SETS: dict[str, frozenset[str]] = {
    **{label: names for label, (names, _) in CALLABLE_SETS.items()},
    "TENSOR_ATTRIBUTES": _allowlist.TENSOR_ATTRIBUTES,
    "OPTIMIZER_METHODS": _allowlist.OPTIMIZER_METHODS,
}

# fmt: off
# The Python operators a worker may run, with the reflected and in-place forms that
# torch.Tensor defines. No other dunder may appear in any set.
OPERATOR_DUNDERS = frozenset({
    "__abs__", "__add__", "__and__", "__eq__", "__floordiv__", "__ge__", "__getitem__", "__gt__",
    "__iadd__", "__iand__", "__ifloordiv__", "__ilshift__", "__imod__", "__imul__", "__invert__",
    "__ior__", "__ipow__", "__irshift__", "__isub__", "__itruediv__", "__ixor__", "__le__",
    "__lshift__", "__lt__", "__matmul__", "__mod__", "__mul__", "__ne__", "__neg__", "__or__",
    "__pos__", "__pow__", "__radd__", "__rand__", "__rfloordiv__", "__rlshift__", "__rmatmul__",
    "__rmod__", "__rmul__", "__ror__", "__rpow__", "__rrshift__", "__rshift__", "__rsub__",
    "__rtruediv__", "__rxor__", "__setitem__", "__sub__", "__truediv__", "__xor__",
})

# Names that must never be reachable, one per deny category (and then some).
DANGEROUS = [
    # Files, sockets and downloads.
    "save", "load", "from_file", "tofile", "hub", "serialization", "get_file_path",
    "import_ir_module", "import_ir_module_from_buffer", "module_load",
    # Process-global state and settings.
    "manual_seed", "seed", "initial_seed", "get_rng_state", "set_rng_state", "random",
    "set_num_threads", "set_num_interop_threads", "set_default_dtype", "set_default_device",
    "set_default_tensor_type", "set_grad_enabled", "set_printoptions", "set_flush_denormal",
    "set_anomaly_enabled", "set_warn_always", "use_deterministic_algorithms",
    "set_float32_matmul_precision", "autograd", "no_grad", "enable_grad", "inference_mode",
    # Raw memory: pointers, storages, aliasing, foreign buffers.
    "set_", "data_ptr", "const_data_ptr", "storage", "untyped_storage", "storage_offset",
    "storage_type", "share_memory_", "is_shared", "pin_memory", "is_pinned", "is_set_to",
    "as_strided", "as_strided_", "as_strided_scatter", "as_strided_copy", "empty_strided",
    "new_empty_strided", "new", "from_numpy", "frombuffer", "from_dlpack", "to_dlpack",
    "asarray", "numpy", "__array__", "__array_wrap__", "__dlpack__", "__dlpack_device__",
    "__cuda_array_interface__", "__hash__", "record_stream",
    # Uninitialised memory: may hold another client's freed tensor.
    "empty", "empty_like", "empty_permuted", "new_empty", "resize_", "resize_as_", "resize",
    # Python callables and hooks.
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "vmap",
    "while_loop", "lobpcg", "triplet_margin_with_distance_loss", "as_subclass",
    # Pickling and the object protocol.
    "__reduce__", "__reduce_ex__", "__setstate__", "__getstate__", "__deepcopy__", "__class__",
    "__dict__", "__getattribute__", "__setattr__", "__delattr__", "__init__", "__new__",
    "__init_subclass__", "__subclasshook__", "__torch_function__", "__torch_dispatch__",
    "__format__", "__repr__", "__delitem__", "__weakref__",
    # Other devices.
    "cuda", "xpu", "ipu", "mtia", "mps", "type", "get_device",
    # Sparse, quantized, nested and named tensors; mkldnn.
    "sparse", "to_sparse", "to_dense", "sparse_coo_tensor", "indices", "values", "coalesce",
    "quantize_per_tensor", "dequantize", "int_repr", "q_scale", "nested", "to_padded_tensor",
    "masked", "names", "rename", "refine_names", "to_mkldnn",
    # Compilers, operator registries and other subsystems.
    "compile", "jit", "fx", "export", "ops", "classes", "library", "distributed", "backends",
    "utils", "testing", "profiler", "multiprocessing", "package", "fork", "wait",
    "os", "sys", "importlib", "builtins",
]

# Names that are dangerous in one namespace only: torch.cond takes Python callables
# (torch.linalg.cond is a condition number); torch.nn.functional.grad is a module
# (Tensor.grad is the gradient).
DANGEROUS_IN = [("TORCH_FUNCTIONS", "cond"), ("FUNCTIONAL", "grad")]

# Substrings that mark a whole family of denied names.
DANGEROUS_FRAGMENTS = [
    "storage", "sparse", "quantiz", "cuda", "cudnn", "mkldnn", "miopen", "dlpack", "numpy",
    "hook", "seed", "rng", "save", "load", "file", "pin_memory", "share_memory", "strided",
    "data_ptr", "autocast", "nested", "empty", "resize",
]

# Names the brief asks for by name (less `empty` and `empty_like`: see DANGEROUS).
REQUIRED: dict[str, list[str]] = {
    "TENSOR_METHODS": [
        "add", "add_", "sub", "mul", "div", "matmul", "mm", "bmm", "t", "transpose", "permute",
        "reshape", "view", "view_as", "flatten", "squeeze", "unsqueeze", "expand", "repeat", "sum",
        "mean", "std", "var", "max", "min", "argmax", "softmax", "log_softmax", "relu", "sigmoid",
        "tanh", "exp", "log", "sqrt", "abs", "clamp", "pow", "float", "double", "long", "int",
        "half", "bool", "to", "type_as", "clone", "detach", "detach_", "contiguous", "item",
        "tolist", "numel", "size", "dim", "zero_", "fill_", "copy_", "requires_grad_", "backward",
        "norm", "chunk", "split", "unbind", "gather", "scatter", "index_select", "masked_fill",
        "where", "topk", "sort", "cumsum", "retain_grad",
    ],
    "TENSOR_ATTRIBUTES": [
        "T", "mT", "H", "mH", "grad", "data", "real", "imag", "shape", "dtype", "requires_grad",
        "is_leaf", "ndim",
    ],
    "TORCH_FUNCTIONS": [
        "tensor", "zeros", "ones", "full", "arange", "linspace", "eye", "rand", "randn", "randint",
        "zeros_like", "ones_like", "rand_like", "randn_like", "full_like", "add", "sub", "mul",
        "div", "matmul", "mm", "bmm", "cat", "stack", "hstack", "vstack", "where", "sum", "mean",
        "max", "min", "argmax", "softmax", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "abs",
        "clamp", "transpose", "reshape", "flatten", "squeeze", "unsqueeze", "chunk", "split",
        "gather", "topk", "sort", "allclose", "equal", "isclose", "einsum", "norm", "dist", "cdist",
        "outer", "dot",
    ],
    "FUNCTIONAL": [
        "relu", "gelu", "silu", "leaky_relu", "elu", "softmax", "log_softmax", "sigmoid", "tanh",
        "linear", "conv1d", "conv2d", "max_pool2d", "avg_pool2d", "dropout", "mse_loss", "l1_loss",
        "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
        "smooth_l1_loss", "one_hot", "pad", "normalize", "layer_norm", "batch_norm", "embedding",
        "cosine_similarity",
    ],
    "LINALG": [
        "norm", "vector_norm", "matrix_norm", "det", "inv", "solve", "svd", "qr", "eigh",
        "eigvalsh", "cholesky", "lstsq", "matrix_power", "matrix_rank", "pinv", "cross",
    ],
}
# fmt: on

NAMESPACES: list[Any] = [torch, torch.Tensor, torch.nn.functional, torch.linalg]


def _probe_tensor() -> torch.Tensor:
    """A complex leaf that needs grad, so every listed property can be read from it."""
    return torch.ones(2, 3, dtype=torch.complex64, requires_grad=True)


def test_public_names_are_exactly_the_frozensets_of_str_and_the_optimizers() -> None:
    assert sorted(_allowlist.__all__) == sorted([*ALL_SETS, "OPTIMIZERS"])
    public = {name for name in vars(_allowlist) if not name.startswith("_")}
    assert public - {"annotations"} == {*ALL_SETS, "OPTIMIZERS"}
    for label, names in ALL_SETS.items():
        assert type(getattr(_allowlist, label)) is frozenset, label
        assert names, label
        assert all(type(name) is str and name.isidentifier() for name in names), label
    # Optimizers: torch.optim classes, each with the hyperparameters it may be given.
    for name, options in _allowlist.OPTIMIZERS.items():
        assert issubclass(getattr(torch.optim, name), torch.optim.Optimizer), name
        assert type(options) is frozenset and "lr" in options, name


@pytest.mark.parametrize("label", sorted(CALLABLE_SETS))
def test_callable_names_exist_and_are_plain_callables(label: str) -> None:
    names, namespace = CALLABLE_SETS[label]
    missing = sorted(name for name in names if not hasattr(namespace, name))
    assert missing == [], f"{label}: not in {namespace.__name__}: {missing}"
    wrong = sorted(
        name
        for name in names
        if not callable(obj := getattr(namespace, name))
        or isinstance(obj, (type, types.ModuleType))
    )
    assert wrong == [], f"{label}: not plain callables: {wrong}"


def test_tensor_methods_are_bound_methods_on_an_instance() -> None:
    tensor = _probe_tensor()
    wrong = sorted(
        name for name in _allowlist.TENSOR_METHODS if not callable(getattr(tensor, name))
    )
    assert wrong == []


def test_tensor_attributes_exist_and_are_not_callable() -> None:
    tensor = _probe_tensor()
    tensor.grad = torch.zeros_like(tensor)  # so that `grad` holds a tensor, not None
    for name in sorted(_allowlist.TENSOR_ATTRIBUTES):
        assert hasattr(torch.Tensor, name), name
        assert not callable(getattr(torch.Tensor, name)), name  # a descriptor, not a method
        assert not callable(getattr(tensor, name)), name
    assert isinstance(tensor.grad, torch.Tensor)


def test_attributes_and_methods_are_disjoint() -> None:
    assert _allowlist.TENSOR_ATTRIBUTES.isdisjoint(_allowlist.TENSOR_METHODS)


@pytest.mark.parametrize("label", sorted(ALL_SETS))
def test_no_private_names_and_only_operator_dunders(label: str) -> None:
    names = ALL_SETS[label]
    underscored = {name for name in names if name.startswith("_")}
    if label == "TENSOR_METHODS":
        assert underscored <= OPERATOR_DUNDERS, sorted(underscored - OPERATOR_DUNDERS)
    else:
        assert underscored == set(), sorted(underscored)


def test_operator_dunders_are_all_there() -> None:
    # Every operator torch.Tensor really has; a dunder list that went stale fails here.
    assert all(hasattr(torch.Tensor, name) for name in OPERATOR_DUNDERS)
    assert sorted(OPERATOR_DUNDERS - _allowlist.TENSOR_METHODS) == []


def test_dangerous_list_is_long_enough_and_real() -> None:
    assert len(DANGEROUS) >= 40
    assert len(set(DANGEROUS)) == len(DANGEROUS)
    # A misspelt name would make its check vacuous, so each must exist somewhere. The
    # exceptions: NumPy's `tofile` and the named-tensor methods, absent from torch 2.13.0.
    unknown = sorted(name for name in DANGEROUS if not any(hasattr(ns, name) for ns in NAMESPACES))
    assert unknown == ["names", "refine_names", "rename", "tofile"]


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_name_is_in_no_set(name: str) -> None:
    holders = sorted(label for label, names in ALL_SETS.items() if name in names)
    assert holders == [], f"{name!r} is allowed in {holders}"


@pytest.mark.parametrize(("label", "name"), DANGEROUS_IN)
def test_namespace_specific_danger_is_not_in_that_set(label: str, name: str) -> None:
    _, namespace = CALLABLE_SETS[label]
    assert hasattr(namespace, name)
    assert name not in ALL_SETS[label]


@pytest.mark.parametrize("fragment", DANGEROUS_FRAGMENTS)
def test_no_name_contains_a_dangerous_fragment(fragment: str) -> None:
    hits = sorted(
        f"{label}.{name}" for label, names in ALL_SETS.items() for name in names if fragment in name
    )
    assert hits == []


def test_no_global_setters_anywhere() -> None:
    setters = sorted(
        name
        for names in ALL_SETS.values()
        for name in names
        if name.startswith(("set_", "get_", "is_autocast", "is_grad", "use_"))
    )
    assert setters == []


@pytest.mark.parametrize("label", sorted(REQUIRED))
def test_required_names_are_present(label: str) -> None:
    missing = sorted(set(REQUIRED[label]) - ALL_SETS[label])
    assert missing == []


def test_allowed_names_run_on_cpu_the_way_the_worker_calls_them() -> None:
    method = {name: getattr(torch.Tensor, name) for name in ("__radd__", "__mul__", "sum", "t")}
    function = {name: getattr(torch, name) for name in ("matmul", "tensor")}
    x = function["tensor"]([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], requires_grad=True)
    assert method["__radd__"](x, 1.0).tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert method["sum"](method["__mul__"](x, x)).item() == 55.0
    y = function["matmul"](x, method["t"](x))
    assert y.shape == (2, 2)
    backward = "backward"
    getattr(torch.Tensor, backward)(method["sum"](y))
    assert [getattr(x, name) is not None for name in ("grad", "shape")] == [True, True]
    for namespace, name, expected in [
        (torch.linalg, "vector_norm", 2.0),
        (torch.nn.functional, "relu", 4.0),
    ]:
        assert getattr(namespace, name)(torch.ones(4)).sum().item() == expected
