// pybind11 bindings of the rdn_kernels._C extension: the torch-facing glue only.
#include <torch/extension.h>

#include <utility>

#include "cpu/nested_conv_cpu.h"
#ifdef RDN_WITH_CUDA
#include "cuda/nested_conv_cuda.h"
#endif

namespace {

rdn::BlockLayout make_layout(std::vector<int64_t> in_offsets, std::vector<int64_t> out_offsets,
                             const std::vector<bool>& mask) {
  const size_t groups = in_offsets.size() - 1;
  TORCH_CHECK(out_offsets.size() == groups + 1 && mask.size() == groups * groups, "rdn: inconsistent block layout");
  return {std::move(in_offsets), std::move(out_offsets), mask};
}

// A backend's forward as Python calls it: the layout and the geometry come as plain lists.
template <rdn::ForwardFn* forward>
at::Tensor forward_from_lists(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              std::vector<int64_t> in_offsets, std::vector<int64_t> out_offsets,
                              const std::vector<bool>& mask, std::vector<int64_t> stride,
                              std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t lo, int64_t hi,
                              const c10::optional<at::Tensor>& out) {
  return forward(input, weight, bias, make_layout(std::move(in_offsets), std::move(out_offsets), mask),
                 {std::move(stride), std::move(padding), std::move(dilation)}, lo, hi, out);
}

// A backend's backward as Python calls it (lists, as forward_from_lists).
template <rdn::BackwardFn* backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_from_lists(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, bool has_bias,
    std::vector<int64_t> in_offsets, std::vector<int64_t> out_offsets, const std::vector<bool>& mask,
    std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t lo, int64_t hi,
    bool needs_input, bool needs_weight) {
  return backward(grad_output, input, weight, has_bias,
                  make_layout(std::move(in_offsets), std::move(out_offsets), mask),
                  {std::move(stride), std::move(padding), std::move(dilation)}, lo, hi, needs_input, needs_weight);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rdn_kernels C++ kernels: nested (block-lower-triangular) convolution";
#ifdef RDN_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("nested_conv2d_forward_cpu", &forward_from_lists<rdn::cpu::forward>,
        "Nested conv2d forward of output groups lo..hi-1 (CPU).");
  m.def("nested_conv2d_backward_cpu", &backward_from_lists<rdn::cpu::backward>,
        "Nested conv2d backward (CPU): (grad_input, grad_weight, grad_bias).");
  m.def("set_uninitialized_fill", &rdn::set_uninitialized_fill, py::arg("value"),
        "Fill the output buffers the kernels allocate with `value` (None: leave them uninitialised).");
  m.def("uninitialized_fill", &rdn::uninitialized_fill, "The fill value of new output buffers, or None.");
  m.def("out_provably_disjoint", &rdn::out_provably_disjoint, py::arg("out"), py::arg("operands"),
        "True when `out` provably overlaps neither itself nor any operand (False: not proven).");
  m.def("empty_like", &rdn::empty_like, py::arg("tensor"),
        "A new buffer shaped like `tensor`, as the kernels allocate their outputs (for the tests).");
#ifdef RDN_WITH_CUDA
  m.def("nested_conv2d_forward_cuda", &forward_from_lists<rdn::cuda::forward>,
        "Nested conv2d forward of output groups lo..hi-1 (CUDA).");
  m.def("nested_conv2d_backward_cuda", &backward_from_lists<rdn::cuda::backward>,
        "Nested conv2d backward (CUDA): (grad_input, grad_weight, grad_bias).");
#endif
}
