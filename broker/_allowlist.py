"""The worker's allow-list: the only operations a client can name over the wire.

Policy: allow pure computation on CPU tensors, nothing else. A name is listed only if it
exists in torch 2.13.0 and does not read or write files or sockets; change process-wide
state or settings; expose, alias or hand out raw memory (pointers, storages, as_strided,
uninitialised buffers, NumPy or DLPack views); take Python callables or hooks; touch the
pickle or object protocols; move data off the CPU; belong to the sparse, quantized, nested
or named-tensor APIs; or reach into compile/jit/fx, ops, classes, library, distributed,
backends, utils, testing or profiler. No private (`_`) names except operator dunders.
Anything not listed here is refused: leaving a useful name out costs a feature request,
listing a dangerous one costs the worker.
"""

from __future__ import annotations

__all__ = [
    "FUNCTIONAL",
    "LINALG",
    "OPTIMIZERS",
    "OPTIMIZER_METHODS",
    "TENSOR_ATTRIBUTES",
    "TENSOR_METHODS",
    "TORCH_FUNCTIONS",
]

# One topic per block, names sorted alphabetically within each block. The layout is
# hand-kept for review, so the formatter leaves it alone.
# fmt: off

# Called as `getattr(torch.Tensor, name)(self, *args, **kwargs)`.
TENSOR_METHODS: frozenset[str] = frozenset({
    # Python operators: arithmetic, matmul, unary.
    "__abs__", "__add__", "__floordiv__", "__matmul__", "__mod__", "__mul__", "__neg__", "__pos__",
    "__pow__", "__sub__", "__truediv__",

    # Reflected forms of those operators.
    "__radd__", "__rfloordiv__", "__rmatmul__", "__rmod__", "__rmul__", "__rpow__", "__rsub__",
    "__rtruediv__",

    # In-place forms of those operators (torch.Tensor has no __imatmul__).
    "__iadd__", "__ifloordiv__", "__imod__", "__imul__", "__ipow__", "__isub__", "__itruediv__",

    # Bitwise operators, with their reflected and in-place forms.
    "__and__", "__iand__", "__ilshift__", "__invert__", "__ior__", "__irshift__", "__ixor__",
    "__lshift__", "__or__", "__rand__", "__rlshift__", "__ror__", "__rrshift__", "__rshift__",
    "__rxor__", "__xor__",

    # Rich comparisons and indexing.
    "__eq__", "__ge__", "__getitem__", "__gt__", "__le__", "__lt__", "__ne__", "__setitem__",

    # Elementwise arithmetic.
    "abs", "abs_", "absolute", "absolute_", "add", "add_", "addcdiv", "addcdiv_", "addcmul",
    "addcmul_", "ceil", "ceil_", "clamp", "clamp_", "clamp_max", "clamp_max_", "clamp_min",
    "clamp_min_", "clip", "clip_", "copysign", "copysign_", "div", "div_", "divide", "divide_",
    "fix", "fix_", "float_power", "float_power_", "floor", "floor_", "floor_divide",
    "floor_divide_", "fmax", "fmin", "fmod", "fmod_", "frac", "frac_", "frexp", "gcd", "gcd_",
    "heaviside", "heaviside_", "hypot", "hypot_", "lcm", "lcm_", "ldexp", "ldexp_", "lerp", "lerp_",
    "maximum", "minimum", "mul", "mul_", "multiply", "multiply_", "nan_to_num", "nan_to_num_",
    "neg", "neg_", "negative", "negative_", "nextafter", "nextafter_", "positive", "pow", "pow_",
    "reciprocal", "reciprocal_", "remainder", "remainder_", "round", "round_", "rsqrt", "rsqrt_",
    "sgn", "sgn_", "sign", "sign_", "signbit", "sqrt", "sqrt_", "square", "square_", "sub", "sub_",
    "subtract", "subtract_", "true_divide", "true_divide_", "trunc", "trunc_", "xlogy", "xlogy_",

    # Exponentials, logarithms, trigonometry and special functions.
    "acos", "acos_", "acosh", "acosh_", "arccos", "arccos_", "arccosh", "arccosh_", "arcsin",
    "arcsin_", "arcsinh", "arcsinh_", "arctan", "arctan2", "arctan2_", "arctan_", "arctanh",
    "arctanh_", "asin", "asin_", "asinh", "asinh_", "atan", "atan2", "atan2_", "atan_", "atanh",
    "atanh_", "cos", "cos_", "cosh", "cosh_", "deg2rad", "deg2rad_", "digamma", "digamma_", "erf",
    "erf_", "erfc", "erfc_", "erfinv", "erfinv_", "exp", "exp2", "exp2_", "exp_", "expm1", "expm1_",
    "i0", "i0_", "igamma", "igamma_", "igammac", "igammac_", "lgamma", "lgamma_", "log", "log10",
    "log10_", "log1p", "log1p_", "log2", "log2_", "log_", "logaddexp", "logaddexp2", "logit",
    "logit_", "mvlgamma", "mvlgamma_", "polygamma", "polygamma_", "rad2deg", "rad2deg_", "sin",
    "sin_", "sinc", "sinc_", "sinh", "sinh_", "tan", "tan_",

    # Activations.
    "hardshrink", "log_softmax", "prelu", "relu", "relu_", "sigmoid", "sigmoid_", "softmax", "tanh",
    "tanh_",

    # Complex numbers.
    "angle", "conj", "conj_physical", "conj_physical_", "is_complex", "is_conj", "is_neg",
    "resolve_conj", "resolve_neg",

    # Bitwise and logical functions.
    "bitwise_and", "bitwise_and_", "bitwise_left_shift", "bitwise_left_shift_", "bitwise_not",
    "bitwise_not_", "bitwise_or", "bitwise_or_", "bitwise_right_shift", "bitwise_right_shift_",
    "bitwise_xor", "bitwise_xor_", "logical_and", "logical_and_", "logical_not", "logical_not_",
    "logical_or", "logical_or_", "logical_xor", "logical_xor_",

    # Comparisons and predicates.
    "allclose", "eq", "eq_", "equal", "ge", "ge_", "greater", "greater_", "greater_equal",
    "greater_equal_", "gt", "gt_", "isclose", "isfinite", "isinf", "isnan", "isneginf", "isposinf",
    "isreal", "le", "le_", "less", "less_", "less_equal", "less_equal_", "lt", "lt_", "ne", "ne_",
    "not_equal", "not_equal_",

    # Reductions, statistics, sorting and searching.
    "all", "amax", "amin", "aminmax", "any", "argmax", "argmin", "argsort", "argwhere", "bincount",
    "corrcoef", "count_nonzero", "cov", "cummax", "cummin", "cumprod", "cumprod_", "cumsum",
    "cumsum_", "diff", "dist", "histc", "histogram", "kthvalue", "logcumsumexp", "logsumexp", "max",
    "mean", "median", "min", "mode", "msort", "nanmean", "nanmedian", "nanquantile", "nansum",
    "nonzero", "nonzero_static", "norm", "prod", "quantile", "renorm", "renorm_", "sort", "std",
    "sum", "topk", "unique", "unique_consecutive", "var",

    # Matrix products and linear algebra.
    "addbmm", "addbmm_", "addmm", "addmm_", "addmv", "addmv_", "addr", "addr_", "baddbmm",
    "baddbmm_", "bmm", "cholesky", "cholesky_inverse", "cholesky_solve", "cross", "det", "dot",
    "geqrf", "ger", "inner", "inverse", "kron", "logdet", "lu", "lu_solve", "matmul", "matrix_exp",
    "matrix_power", "mm", "mv", "orgqr", "ormqr", "outer", "pinverse", "qr", "slogdet", "svd",
    "trace", "triangular_solve", "vdot",

    # Signal processing.
    "istft", "stft",

    # Shape, views and reordering. (`view` also reinterprets a dtype; bounds are still checked.)
    "adjoint", "broadcast_to", "chunk", "contiguous", "diag", "diag_embed", "diagflat", "diagonal",
    "dsplit", "expand", "expand_as", "flatten", "flip", "fliplr", "flipud", "hsplit", "moveaxis",
    "movedim", "narrow", "narrow_copy", "permute", "ravel", "repeat", "repeat_interleave",
    "reshape", "reshape_as", "roll", "rot90", "select", "split", "split_with_sizes", "squeeze",
    "squeeze_", "sum_to_size", "swapaxes", "swapaxes_", "swapdims", "swapdims_", "t", "t_",
    "tensor_split", "tile", "transpose", "transpose_", "tril", "tril_", "triu", "triu_", "unbind",
    "unflatten", "unfold", "unsqueeze", "unsqueeze_", "view", "view_as", "vsplit",

    # Indexing, gathering, scattering and masking.
    "diagonal_scatter", "fill_diagonal_", "gather", "index_add", "index_add_", "index_copy",
    "index_copy_", "index_fill", "index_fill_", "index_put", "index_put_", "index_reduce",
    "index_reduce_", "index_select", "masked_fill", "masked_fill_", "masked_scatter",
    "masked_scatter_", "masked_select", "put", "put_", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "scatter_reduce", "scatter_reduce_", "select_scatter", "slice_scatter", "take",
    "take_along_dim", "where",

    # In-place filling and random sampling (from the worker's default generator).
    "bernoulli", "bernoulli_", "cauchy_", "copy_", "exponential_", "fill_", "geometric_",
    "log_normal_", "multinomial", "normal_", "random_", "uniform_", "zero_",

    # Conversions: dtype, copies and values. `to` and `cpu` stay on the CPU here.
    "bfloat16", "bool", "byte", "cdouble", "cfloat", "chalf", "char", "clone", "cpu", "double",
    "float", "half", "int", "item", "long", "short", "to", "tolist", "type_as",

    # Metadata.
    "dim", "element_size", "is_contiguous", "is_floating_point", "is_inference", "is_nonzero",
    "is_same_size", "is_signed", "ndimension", "nelement", "numel", "size", "stride",

    # Autograd.
    "backward", "detach", "detach_", "requires_grad_", "retain_grad",

    # Constructors from sizes or plain values (new_empty* would hand out uninitialised memory).
    "new_full", "new_ones", "new_tensor", "new_zeros",
})


# Read as `getattr(tensor, name)`: properties, never methods.
TENSOR_ATTRIBUTES: frozenset[str] = frozenset({
    # Views and parts.
    "H", "T", "data", "imag", "mH", "mT", "real",

    # Metadata.
    "device", "dtype", "is_leaf", "itemsize", "nbytes", "ndim", "requires_grad", "retains_grad",
    "shape",

    # Gradient.
    "grad",
})


# Called as `getattr(torch, name)(*args, **kwargs)`.
TORCH_FUNCTIONS: frozenset[str] = frozenset({
    # Creation from sizes and plain values.
    "arange", "eye", "full", "full_like", "linspace", "logspace", "ones", "ones_like",
    "scalar_tensor", "tensor", "tril_indices", "triu_indices", "zeros", "zeros_like",

    # Window functions.
    "bartlett_window", "blackman_window", "hamming_window", "hann_window", "kaiser_window",

    # Random creation and sampling (from the worker's default generator).
    "bernoulli", "binomial", "multinomial", "normal", "poisson", "rand", "rand_like", "randint",
    "randint_like", "randn", "randn_like", "randperm",

    # Elementwise arithmetic.
    "abs", "abs_", "absolute", "add", "addcdiv", "addcmul", "ceil", "ceil_", "clamp", "clamp_",
    "clamp_max", "clamp_max_", "clamp_min", "clamp_min_", "clip", "clip_", "copysign", "div",
    "divide", "fix", "fix_", "float_power", "floor", "floor_", "floor_divide", "fmax", "fmin",
    "fmod", "frac", "frac_", "frexp", "gcd", "gcd_", "heaviside", "hypot", "lcm", "lcm_", "ldexp",
    "ldexp_", "lerp", "maximum", "minimum", "mul", "multiply", "nan_to_num", "nan_to_num_", "neg",
    "neg_", "negative", "negative_", "nextafter", "positive", "pow", "reciprocal", "reciprocal_",
    "remainder", "round", "round_", "rsqrt", "rsqrt_", "rsub", "sgn", "sign", "signbit", "sqrt",
    "sqrt_", "square", "square_", "sub", "subtract", "true_divide", "trunc", "trunc_", "xlogy",
    "xlogy_",

    # Exponentials, logarithms, trigonometry and special functions.
    "acos", "acos_", "acosh", "acosh_", "arccos", "arccos_", "arccosh", "arccosh_", "arcsin",
    "arcsin_", "arcsinh", "arcsinh_", "arctan", "arctan2", "arctan_", "arctanh", "arctanh_", "asin",
    "asin_", "asinh", "asinh_", "atan", "atan2", "atan_", "atanh", "atanh_", "cos", "cos_", "cosh",
    "cosh_", "deg2rad", "deg2rad_", "digamma", "erf", "erf_", "erfc", "erfc_", "erfinv", "exp",
    "exp2", "exp2_", "exp_", "expm1", "expm1_", "i0", "i0_", "igamma", "igammac", "lgamma", "log",
    "log10", "log10_", "log1p", "log1p_", "log2", "log2_", "log_", "logaddexp", "logaddexp2",
    "logit", "logit_", "mvlgamma", "polygamma", "rad2deg", "rad2deg_", "sin", "sin_", "sinc",
    "sinc_", "sinh", "sinh_", "tan", "tan_",

    # Activations.
    "celu", "celu_", "hardshrink", "log_softmax", "prelu", "relu", "relu_", "rrelu", "rrelu_",
    "selu", "selu_", "sigmoid", "sigmoid_", "softmax", "tanh", "tanh_", "threshold", "threshold_",

    # Complex numbers.
    "angle", "complex", "conj", "conj_physical", "conj_physical_", "imag", "is_complex", "is_conj",
    "is_neg", "polar", "real", "resolve_conj", "resolve_neg", "view_as_complex", "view_as_real",

    # Bitwise and logical functions.
    "bitwise_and", "bitwise_left_shift", "bitwise_not", "bitwise_or", "bitwise_right_shift",
    "bitwise_xor", "logical_and", "logical_not", "logical_or", "logical_xor",

    # Comparisons and predicates.
    "allclose", "eq", "equal", "ge", "greater", "greater_equal", "gt", "is_floating_point",
    "is_nonzero", "is_same_size", "is_signed", "is_tensor", "isclose", "isfinite", "isin", "isinf",
    "isnan", "isneginf", "isposinf", "isreal", "le", "less", "less_equal", "lt", "ne", "not_equal",

    # Reductions, statistics, sorting and searching.
    "all", "amax", "amin", "aminmax", "any", "argmax", "argmin", "argsort", "argwhere", "bincount",
    "bucketize", "corrcoef", "count_nonzero", "cov", "cummax", "cummin", "cumprod", "cumsum",
    "cumulative_trapezoid", "diff", "gradient", "histc", "histogram", "histogramdd", "kthvalue",
    "logcumsumexp", "logsumexp", "max", "mean", "median", "min", "mode", "msort", "nanmean",
    "nanmedian", "nanquantile", "nansum", "nonzero", "nonzero_static", "norm", "numel", "prod",
    "quantile", "renorm", "searchsorted", "sort", "std", "std_mean", "sum", "topk", "trapezoid",
    "trapz", "unique", "unique_consecutive", "unravel_index", "var", "var_mean",

    # Matrix products and linear algebra.
    "addbmm", "addmm", "addmv", "addmv_", "addr", "baddbmm", "bmm", "cholesky", "cholesky_inverse",
    "cholesky_solve", "cross", "det", "dot", "einsum", "geqrf", "ger", "inner", "inverse", "kron",
    "logdet", "lu", "lu_solve", "lu_unpack", "matmul", "matrix_exp", "matrix_power", "mm", "mv",
    "orgqr", "ormqr", "outer", "pca_lowrank", "pinverse", "qr", "slogdet", "svd", "svd_lowrank",
    "tensordot", "trace", "triangular_solve", "vander", "vdot",

    # Distances.
    "cdist", "cosine_similarity", "dist", "pairwise_distance", "pdist",

    # Signal processing.
    "istft", "stft",

    # Joining, splitting, shape and views.
    "adjoint", "atleast_1d", "atleast_2d", "atleast_3d", "block_diag", "broadcast_shapes",
    "broadcast_tensors", "broadcast_to", "cartesian_prod", "cat", "chunk", "column_stack",
    "combinations", "concat", "concatenate", "diag", "diag_embed", "diagflat", "diagonal", "dsplit",
    "dstack", "flatten", "flip", "fliplr", "flipud", "hsplit", "hstack", "meshgrid", "moveaxis",
    "movedim", "narrow", "narrow_copy", "permute", "ravel", "repeat_interleave", "reshape", "roll",
    "rot90", "row_stack", "select", "split", "split_with_sizes", "squeeze", "stack", "swapaxes",
    "swapdims", "t", "tensor_split", "tile", "transpose", "tril", "triu", "unbind", "unflatten",
    "unsqueeze", "vsplit", "vstack",

    # Indexing, gathering, scattering and masking.
    "diagonal_scatter", "gather", "index_add", "index_copy", "index_fill", "index_put",
    "index_put_", "index_reduce", "index_select", "masked_fill", "masked_scatter", "masked_select",
    "put", "scatter", "scatter_add", "scatter_reduce", "select_scatter", "slice_scatter", "take",
    "take_along_dim", "where",

    # Filling, copying and autograd.
    "clone", "detach", "detach_", "fill", "fill_", "zero_",

    # Dtype promotion rules (pure functions of dtypes).
    "can_cast", "promote_types", "result_type",
})


# Called as `getattr(torch.nn.functional, name)(*args, **kwargs)`.
FUNCTIONAL: frozenset[str] = frozenset({
    # Activations.
    "celu", "celu_", "elu", "elu_", "gelu", "glu", "gumbel_softmax", "hardshrink", "hardsigmoid",
    "hardswish", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "log_softmax", "logsigmoid",
    "mish", "prelu", "relu", "relu6", "relu_", "rrelu", "rrelu_", "selu", "selu_", "sigmoid",
    "silu", "softmax", "softmin", "softplus", "softshrink", "softsign", "tanh", "tanhshrink",
    "threshold", "threshold_",

    # Linear layers, convolutions and attention.
    "bilinear", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "fold", "linear", "multi_head_attention_forward",
    "scaled_dot_product_attention", "unfold",

    # Pooling.
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices",
    "adaptive_max_pool3d", "adaptive_max_pool3d_with_indices", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "fractional_max_pool2d", "fractional_max_pool2d_with_indices",
    "fractional_max_pool3d", "fractional_max_pool3d_with_indices", "lp_pool1d", "lp_pool2d",
    "lp_pool3d", "max_pool1d", "max_pool1d_with_indices", "max_pool2d", "max_pool2d_with_indices",
    "max_pool3d", "max_pool3d_with_indices", "max_unpool1d", "max_unpool2d", "max_unpool3d",

    # Normalisation and dropout.
    "alpha_dropout", "batch_norm", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "feature_alpha_dropout", "group_norm", "instance_norm", "layer_norm", "local_response_norm",
    "normalize", "rms_norm",

    # Losses.
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cosine_embedding_loss",
    "cross_entropy", "ctc_loss", "gaussian_nll_loss", "hinge_embedding_loss", "huber_loss",
    "kl_div", "l1_loss", "margin_ranking_loss", "mse_loss", "multi_margin_loss",
    "multilabel_margin_loss", "multilabel_soft_margin_loss", "nll_loss", "poisson_nll_loss",
    "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss",

    # Embeddings, distances, padding, resampling and reshaping.
    "affine_grid", "channel_shuffle", "cosine_similarity", "embedding", "embedding_bag",
    "grid_sample", "interpolate", "one_hot", "pad", "pairwise_distance", "pdist", "pixel_shuffle",
    "pixel_unshuffle",
})


# Called as `getattr(torch.linalg, name)(*args, **kwargs)`.
LINALG: frozenset[str] = frozenset({
    # Norms, determinants and conditioning.
    "cond", "det", "matrix_norm", "matrix_rank", "norm", "slogdet", "svdvals", "vector_norm",

    # Decompositions.
    "cholesky", "cholesky_ex", "eig", "eigh", "eigvals", "eigvalsh", "householder_product",
    "ldl_factor", "ldl_factor_ex", "lu", "lu_factor", "lu_factor_ex", "qr", "svd",

    # Inverses and solvers.
    "inv", "inv_ex", "ldl_solve", "lstsq", "lu_solve", "pinv", "solve", "solve_ex",
    "solve_triangular", "tensorinv", "tensorsolve",

    # Products and matrix functions.
    "cross", "diagonal", "matmul", "matrix_exp", "matrix_power", "multi_dot", "vander", "vecdot",
})
# Optimizers a worker builds over its own tensors (`optim.<name>`), with only the
# hyperparameters listed, each a number or a flag: their state stays on the worker.
OPTIMIZERS: dict[str, frozenset[str]] = {
    "SGD": frozenset({"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}),
    "Adam": frozenset({"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"}),
}

# Called as `optimizer.<name>(**kwargs)` on a worker's optimizer (`Optimizer.<name>`).
# `reset` is ours: it forgets the optimizer's state (momentum buffers, Adam's moments and
# step counts), as a new optimizer over the same parameters would start.
OPTIMIZER_METHODS: frozenset[str] = frozenset({"reset", "step", "zero_grad"})
# fmt: on
