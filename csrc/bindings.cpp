// The pybind11 module mrrm._C: CPU kernels always, CUDA kernels when built with MRRM_WITH_CUDA.
#include "mrrm_ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mrrm compiled kernels: gather_value_head (CPU), listwise_ce (CPU and CUDA)";
  m.def("has_cuda", []() {
#ifdef MRRM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA sources were compiled into this build");
  m.def("gather_value_head_fwd", &mrrm::gather_value_head_fwd, py::arg("hidden"), py::arg("positions"),
        py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("activation"), py::arg("scale"));
  m.def("gather_value_head_bwd", &mrrm::gather_value_head_bwd, py::arg("grad_out"), py::arg("hidden"),
        py::arg("positions"), py::arg("w1"), py::arg("w2"), py::arg("z"), py::arg("activation"),
        py::arg("scale"), py::arg("need_hidden_grad"));
  m.def("listwise_ce_fwd_bwd", &mrrm::listwise_ce_fwd_bwd, py::arg("scores"), py::arg("group_offsets"),
        py::arg("targets"), py::arg("loss"),
        "per-group loss and d loss / d scores in one pass; CPU or CUDA by the device of scores");
}
